"""The studio's pages, one per sidebar entry; each takes (session, settings) and calls only the engine."""
