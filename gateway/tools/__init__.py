"""Tools from MCP servers: the configuration (:mod:`gateway.tools.config`), the
model-facing names (:mod:`gateway.tools.names`), and the hub that runs the servers
(:class:`gateway.tools.servers.ToolHub`). The package itself imports nothing, so
that reading the settings does not load the MCP SDK."""
