"""A local cluster lab for `haguard demo` (and anyone who wants to try haguard on one machine).

Everything the demo starts lives here, all of it torn down by `Lab.close()`:

    net.py     three "hosts": network namespaces joined by a bridge in a hub namespace
               (198.18.7.0/24) when root, else three loopback addresses (127.0.0.{1,2,3});
    broker.py  a private mosquitto, in the hub namespace (or on 127.0.0.1, a free port);
    fence.py   a fence device stand-in speaking the fence-agent protocol
               (`python -m haguard.lab.fence`): it "powers off" a host by killing its QEMUs;
    cluster.py the agents (`haguard run --config HOST.yaml`, one per host), their configs and
               status files, a host's power-off, `haguard drain` inside a host;
    watch.py   a thread sampling every host's QEMUs over QMP, recording where each VM runs
               and any instant at which one runs twice;
    softdog.py watchdog devices served through FUSE that answer the real ioctls and expire as
               Linux's softdog does (these machines have no watchdog device).

Unlike tests/helpers (which the tests use), this package is installed with haguard.
"""
