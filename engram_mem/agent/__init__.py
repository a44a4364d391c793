"""The per-node fetch agent: one process per node runs the read path for all its workers.

service.py the agent (a Ray actor), connection.py one worker's connection to it, reader.py the
worker's side, slots.py the shared buffers between them, protocol.py their messages, launch.py
finding or starting a node's agent. See docs/fetch-agent.md.
"""

from engram_mem.agent.launch import node_agent
from engram_mem.agent.reader import AgentReader

__all__ = ["AgentReader", "node_agent"]
