"""From a trained pair to a running search: export the student, index a database with the teacher,
search it with the student's queries. Heavy optional dependencies (onnx, onnxruntime, faiss) are
imported where they are used, so ``lib`` imports without them."""
