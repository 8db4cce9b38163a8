"""The worker side of serving: the extension, scoring service, KV connector, step recorder and captures."""
