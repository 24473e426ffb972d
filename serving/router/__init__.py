"""The router: one pensieve.v1.Pensieve endpoint in front of N replica servers.

    router = RouterServer(["127.0.0.1:50061", "127.0.0.1:50062"], policy="e2",
                          tokenizer=load_router_tokenizer("random:tiny"), port=50051)
    await router.start() ... await router.shutdown()

Clients use it exactly like one server. Each call goes to one replica, picked by the policy
(routing.py: round-robin, conversation affinity, or Preble's E2 over the global prefix tree in
prefix_tree.py). The servicer (service.py) is thin; its parts, each a module:

    server.py          RouterServer: the service plus health, reflection and background loops
    service.py         RouterService: the gRPC servicer over the parts below
    replicas.py        ReplicaSet, Replica: stubs, health checks, roles, load; gRPC retries
    cache_view.py      CacheView: the prefix tree and the replicas' cache reports
    prefix_tree.py     PrefixTree (over radix.py's trees, one per cache salt)
    chooser.py         ReplicaChooser: the policy (routing.py) over the healthy replicas
    kv_mover.py        KVMover: a conversation's KV between replicas (MemPool)
    disaggregation.py  Disaggregator: prefill on prefill replicas, decode on decode replicas
    directory.py       ConversationDirectory: which conversation lives where; forgetting
    table.py           ConversationTable: a bounded LRU of conversations
    chat.py, generate.py  the Chat and Generate calls: routing, failover, replay
    records.py, keys.py, stats.py, errors.py  conversations, token keys, counters, errors

Failures: a replica whose call fails with UNAVAILABLE (or whose gRPC health check fails) is
marked down; its prefix-tree entries are dropped and the turn runs again on another replica
(chat.py). The health loop marks it up again when it answers.
"""

from serving.router.errors import NoReplica
from serving.router.keys import ChatKeys, load_router_tokenizer
from serving.router.prefix_tree import PrefixTree
from serving.router.records import Conversation, Generated
from serving.router.replicas import ROLES, SERVICE_NAME, Replica, ReplicaSet
from serving.router.routing import POLICIES, Candidate, Decision, E2Config
from serving.router.server import RouterServer
from serving.router.service import MAX_CONVERSATIONS, RouterService
from serving.router.table import ConversationTable

__all__ = ["ChatKeys", "Candidate", "Conversation", "ConversationTable", "Decision", "E2Config",
           "Generated", "MAX_CONVERSATIONS", "NoReplica", "POLICIES", "PrefixTree", "ROLES",
           "Replica", "ReplicaSet", "RouterServer", "RouterService", "SERVICE_NAME",
           "load_router_tokenizer"]
