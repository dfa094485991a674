"""The digital twin (kind digital_twin): agent.py tracks every declared agent and host and gates start-up;
dashboard.py serves the live page in static/ (agents, start-up order, GPU leases, pipeline figures, alerts).
"""
