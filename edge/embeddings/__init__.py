"""POST /v1/embeddings: schemas, pure translation to EmbeddingsService, serving logic and the router."""
