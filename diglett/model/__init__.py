"""The speaker model: finding and verifying its files (`model_store`), and
embedding windows with it (`embedder`) in fp32, fp16 or int8 (`int8`,
`ecapa_time_major`, `compiled_int8`). Needs torch; no Ray, no FastAPI.
"""
