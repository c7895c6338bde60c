"""Engine-independent speculative decoding: trees, tree library, entropy, policies, verification.

Nothing here knows about the model runner; the worker (spec/worker.py) glues it to the engine.
"""
