"""Embeddings as numpy arrays: a paraphrase scores higher than an unrelated sentence."""

import os

import numpy as np
from openai import OpenAI

client = OpenAI(base_url=os.environ.get("ARK_BASE_URL", "http://127.0.0.1:8080/v1"), api_key=os.environ["ARK_API_KEY"])
sentences = ["The cat sits on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today."]
response = client.embeddings.create(model="text-embedding-3-small", input=sentences)
vectors = np.array([item.embedding for item in response.data])
print("shape:", vectors.shape, "tokens:", response.usage.prompt_tokens)
print("paraphrase similarity:", round(float(vectors[0] @ vectors[1]), 3))
print("unrelated similarity: ", round(float(vectors[0] @ vectors[2]), 3))
