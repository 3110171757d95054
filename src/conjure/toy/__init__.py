"""A toy world that a tiny model can learn on a CPU: 64x64 images of simple shapes, their captions, an
evaluator that reads the scene back from an image, and the toy base models pre-trained on it. Tests and the
demo use them to prove that training teaches (see docs/architecture.md)."""
