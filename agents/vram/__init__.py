"""GPU memory and local models.

    agent.py      the VRAM optimizer (kind vram_optimizer): grants, queues and revokes leases
    policy.py     who may load what on which GPU (LeasePolicy), and estimates corrected by measurements
    gpus.py       the GPUs as read through NVML, or a simulated GPU for tests (named as such)
    models.py     the GGUF model manager (kind model_manager), loading under leases
    gguf.py       GGUF headers, sizes per layer, and llama.cpp models
"""
