"""Running the gateway: settings, the CLI, logs, metrics, the dev server, the HTTP guard."""
