"""With TLS on the HTTP edge, its gRPC port serves TLS with the same certificate (issue 18: an admin-token model load
went over an insecure gRPC channel while HTTP was HTTPS). A real `cluster edge` process; the RPCs used need no
broker (ServerLive, ServerMetadata), so none runs."""

from __future__ import annotations

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from cluster.config import Addresses
from cluster.local import any_port
from tests.harness import LocalCluster
from tests.test_edge_security import make_certificate

pytestmark = pytest.mark.cluster

TOKEN = "grpc-tls-token"


def test_a_tls_edge_serves_grpc_only_over_tls_with_its_certificate(tmp_path):
    import tritonclient.grpc as triton

    cert, key = make_certificate(tmp_path)
    edges = LocalCluster(
        None, tmp_path, addresses=Addresses(broker_clients=any_port("tcp://127.0.0.1:0")), edge_grpc_port=0
    )
    edge = edges.start_edge("--ssl-certfile", cert, "--ssl-keyfile", key, "--token", TOKEN, "--log-level", "warning")
    try:
        address = edges.grpc_address
        assert address, "the edge reported no gRPC address"
        auth = (("authorization", f"Bearer {TOKEN}"),)

        with grpc.insecure_channel(address) as channel:  # in the clear: refused, the token never leaves
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ServerMetadata(service_pb2.ServerMetadataRequest(), metadata=auth, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value

        with open(cert, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        with grpc.secure_channel(address, credentials) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live
            meta = stub.ServerMetadata(service_pb2.ServerMetadataRequest(), metadata=auth, timeout=10)
            assert meta.name and "model_repository" in meta.extensions, meta
            with pytest.raises(grpc.RpcError) as refused:  # TLS does not replace the token
                stub.ServerMetadata(service_pb2.ServerMetadataRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        client = triton.InferenceServerClient(address, ssl=True, root_certificates=cert)  # as a Triton user would
        try:
            assert client.is_server_live()
            assert client.get_server_metadata(headers={"authorization": f"Bearer {TOKEN}"}).name
        finally:
            client.close()
    except BaseException:
        print(edge.log())
        raise
    finally:
        edges.stop_all()
