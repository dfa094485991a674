"""The topic model (kind topic_model).

    agent.py      the agent: scores every stored document, checkpoints, publishes doc.scored
    dedup.py      near-duplicate index (faiss)
    online.py     online topics that grow, c-TF-IDF labels, novelty
"""
