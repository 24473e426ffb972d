"""The checked-in stubs (serving/pensieve/v1/) are what proto/pensieve/v1/pensieve.proto generates."""

import re

from google.protobuf import descriptor_pb2

from serving import codegen
from serving.pensieve.v1 import pensieve_pb2, pensieve_pb2_grpc


def normalized(text: str) -> str:
    """Generated code with the generator's version stamps taken out (they follow grpcio-tools)."""
    text = re.sub(r"Protobuf Python Version: \S+", "Protobuf Python Version: X", text)
    text = re.sub(r"(_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,", r"\1 X,", text)
    return re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = 'X'", text)


def test_stubs_are_up_to_date_with_the_proto(tmp_path):
    """Fails when the .proto changed without `python -m serving.codegen`."""
    for fresh in codegen.generate(tmp_path):
        name = fresh.relative_to(tmp_path)
        checked_in = (codegen.PACKAGE_DIR / name).read_text()
        assert normalized(checked_in) == normalized(fresh.read_text()), \
            f"serving/{name} is out of date: run python -m serving.codegen"


def strip_json_names(message_types):
    for message in message_types:
        for field in message.field:
            field.ClearField("json_name")
        strip_json_names(message.nested_type)


def test_descriptor_matches_the_proto(tmp_path):
    from grpc_tools import protoc
    out = tmp_path / "set.pb"
    assert protoc.main(["protoc", f"-I{codegen.PROTO_ROOT}", f"--descriptor_set_out={out}",
                        str(codegen.PROTO_ROOT / codegen.PROTO)]) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    strip_json_names(fresh.message_type)        # the Python generator leaves them out
    ours = descriptor_pb2.FileDescriptorProto.FromString(pensieve_pb2.DESCRIPTOR.serialized_pb)
    assert ours == fresh


def test_stubs_import_as_a_package_with_the_service():
    service = pensieve_pb2.DESCRIPTOR.services_by_name["Pensieve"]
    assert service.full_name == "pensieve.v1.Pensieve"
    assert {m.name for m in service.methods} >= {"Chat", "Generate", "EndConversation", "GetStats"}
    assert service.methods_by_name["Chat"].server_streaming
    assert hasattr(pensieve_pb2_grpc, "PensieveStub")
    assert pensieve_pb2.ChatResponse.__module__ == "serving.pensieve.v1.pensieve_pb2"
    params = pensieve_pb2.SamplingParams(seed=0, temperature=0.0)
    assert params.HasField("seed") and params.HasField("temperature")   # 0 is not "unset"
    assert not pensieve_pb2.SamplingParams().HasField("seed")
