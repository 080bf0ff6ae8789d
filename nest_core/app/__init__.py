"""The application layer: what users run (the HTTP server, the MCP tool), apart from the
decoder and the stores. Imports run downward only: ``nest_core.app`` uses ``nest_core``,
never the other way round; its web and MCP dependencies are extras, imported when a command
starts."""
