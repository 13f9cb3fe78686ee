"""The edge's clients of the gRPC services, opened in the app's lifespan (they belong to its event loop): chat
workers, embeddings, transcription and the session registry. Each turns every grpc.RpcError into an ArkError, so
nothing above them sees gRPC."""
