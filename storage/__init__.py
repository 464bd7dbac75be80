"""Storage: the SQL models and repository (PostgreSQL, SQLite) and the vector index (Qdrant server, Qdrant Edge).
Nothing outside this package knows SQL or Qdrant."""
