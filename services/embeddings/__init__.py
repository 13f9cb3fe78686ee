"""The embeddings service: ark.embeddings.v1.EmbeddingsService, with dynamic batching across concurrent requests."""
