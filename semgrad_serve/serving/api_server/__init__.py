"""The API-server side of serving: routes, page, recent answers, metrics and the scoring client (no torch)."""
