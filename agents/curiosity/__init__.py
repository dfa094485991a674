"""The curiosity agent (kind curiosity).

    agent.py      the agent: learns from doc.scored, reprioritises the crawl's frontier, keeps the hot cache
    policy.py     the curiosity policy (intrinsic reward, destination model, replay, checkpoints)
    hotcache.py   the hot cache (in-process or Redis) under an item and byte budget
"""
