"""The Dobbin broker: a Dobbin object graph served over ZeroMQ.

    from broker.server import BrokerServer    # serve a Database
    from broker.client import BrokerClient    # proxies of the remote objects
    from broker.export import exported        # mark methods clients may call

Modules, by layer: interfaces (the contracts), exc (errors), codec
(msgpack with shared structures), keys (HMAC object keys), protocol (the
message schema), export (what clients may see and do); server, handlers
(serving); transport, changes, proxy, client (the client side).  The wire
protocol is described in docs/protocol.txt, the whole in docs/broker_guide.txt.
"""
