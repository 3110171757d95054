"""Image scores of a run's validation images, the evidence beside the held-out loss for picking a step
(`conjure.runs.best`): fidelity (how close the images are to the training images) and alignment (how well they
still follow the prompt once the trained token is replaced by its class word), both cosine similarities in an
image-text embedding space (CLIP through transformers' CLIPModel).

- `conjure.scoring.scorer`: loading the embedding model (`validation.score_model`), the embeddings and the two
  scores as small functions;
- `conjure.scoring.hook`: what a training session calls after each validation's images (`ImageScoring`): the
  scores logged as the `image_scores` event and to TensorBoard.

A tiny random-weight CLIP for tests and offline trials is built by `conjure.models.tiny_clip`.
"""
