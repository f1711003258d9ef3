"""The inference engine: pipeline files, pure operators, runtimes (ONNX Runtime CPU/CUDA,
TensorRT), the JetStream worker, DICOM SEG/SR results and their publishers.

See ``engine/README.md``. Pure cores live in ``engine.ops``, ``engine.spec``,
``engine.steps``, ``engine.registry`` and ``engine.dicom_results``; the edges are named
after what they talk to (``runtimes``, ``tensorrt_runtime``, ``pacs``, ``worker``).
"""
