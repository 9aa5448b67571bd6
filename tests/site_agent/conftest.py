"""Fixtures for the site agent's tests: a tiny panc8 reference (trained once per session), a real
coordinator on loopback (TLS on, started with the CLI, stopped by PID), and a malicious
coordinator double (a gRPC server implementing the generated servicer) that forwards to the real
one and tampers with chosen answers."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from site_helpers import cli, free_port, run_cli

REFERENCE_STUDIES = ["indrop1", "indrop2", "indrop3", "indrop4", "celseq", "fluidigmc1"]
SITES = ["site-a", "site-b", "site-c", "site-m", "site-d"]
ORIGIN = "test.scarches-fl.local/ledger"


@pytest.fixture(scope="session")
def panc8(shared_data: Path) -> Path:
    return shared_data / "panc8_sub_nebula.h5ad"


@pytest.fixture(scope="session")
def reference_bundle(tmp_path_factory: pytest.TempPathFactory, panc8: Path) -> Path:
    """A tiny reference on the six panc8 reference studies (few epochs: fast, not good)."""
    import anndata as ad

    from scarches_fl.model import ReferenceModel

    full = ad.read_h5ad(panc8)
    ref = full[full.obs["batch"].isin(REFERENCE_STUDIES)].copy()
    model = ReferenceModel.train_reference(
        ref, batch_key="batch", label_key="cell_type", n_hidden=32, n_latent=8, max_epochs=3,
        seed=0, progress=False,
    )
    out = tmp_path_factory.mktemp("reference") / "bundle"
    model.save(out)
    return out


@dataclass
class Consortium:
    root: Path
    coord_dir: Path
    trust: Path
    address: str
    keys: dict[str, Path]
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def client(self) -> Any:
        from protocols.policy import read_trust
        from protocols.registry_client import RegistryClient

        # the PEM itself: RegistryClient's trust.json path reader returns the whole JSON file
        # whenever it contains a PEM (reported to C)
        pem = read_trust(self.trust).tls_root_pem
        return RegistryClient(self.address, trust=pem.encode(), timeout=20)

    def site_dirs(self, site: str) -> tuple[Path, Path]:
        return self.keys[site] / "site.key", self.root / "sites" / site / "state"

    def log_signer(self) -> Any:
        from protocols.checkpoint import parse_signer_key

        return parse_signer_key((self.coord_dir / "keys" / "log.key").read_text().strip())


def _wait_healthy(c: Consortium, deadline_s: float = 60.0) -> None:
    from protocols.errors import TransportError

    t_end = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < t_end:
        if c.proc is not None and c.proc.poll() is not None:
            raise AssertionError(f"coordinator exited: {c.log.read_text() if c.log else ''}")
        try:
            with c.client() as client:
                client.health()
            return
        except TransportError as exc:
            last = exc
            time.sleep(0.3)
    raise AssertionError(f"coordinator not healthy after {deadline_s} s: {last}")


@pytest.fixture(scope="session")
def consortium(tmp_path_factory: pytest.TempPathFactory, reference_bundle: Path):
    """A real coordinator (init, enroll the test sites, serve with TLS on a free port)."""
    root = tmp_path_factory.mktemp("consortium")
    coord = root / "coordinator"
    run_cli("coordinator", "init", "--dir", str(coord), "--reference", str(reference_bundle),
            "--origin", ORIGIN)
    keys = {}
    for site in SITES:
        kdir = root / "sites" / site / "keys"
        run_cli("site", "keygen", "--out", str(kdir))
        run_cli("coordinator", "enroll", "--dir", str(coord), "--site-id", site,
                "--public-key", str(kdir / "site.pub"))
        keys[site] = kdir
    c = Consortium(root=root, coord_dir=coord, trust=coord / "trust.json",
                   address=f"127.0.0.1:{free_port()}", keys=keys)
    c.log = root / "coordinator.log"
    with open(c.log, "wb") as log:
        c.proc = subprocess.Popen(
            cli("coordinator", "serve", "--dir", str(coord), "--listen", c.address),
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        _wait_healthy(c)
        yield c
    finally:
        c.proc.terminate()
        try:
            c.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait(timeout=10)


# --------------------------------------------------------------------------------------------
# A malicious coordinator: forwards to the real one, tampers with what `mode` says.


@dataclass
class Tamper:
    mode: str = "pass"
    submits: list[tuple[bytes, bytes]] = field(default_factory=list)
    forwarded_submits: int = 0
    calls: list[str] = field(default_factory=list)
    #: when set, GetCosignatures answers with this function of the real note (a witness)
    cosign: Any = None


def _servicer(upstream: Any, tamper: Tamper, consortium: Consortium) -> Any:
    import grpc

    from protocols.checkpoint import Checkpoint, generate_signer, sign_checkpoint
    from protocols.checkpoint import verify_checkpoint as _vc
    from protocols.policy import read_trust
    from protocols.proto import registry_pb2 as pb
    from protocols.proto import registry_pb2_grpc as pbg
    from protocols.proto import serde

    trust = read_trust(consortium.trust)

    def real_checkpoint() -> Any:
        info = upstream.get_checkpoint()
        return info, _vc(info.signed_note, origin=trust.origin, log_verifier=trust.log_public_key)

    class Evil(pbg.RegistryServicer):
        def GetCheckpoint(self, request, context):
            tamper.calls.append("GetCheckpoint")
            info, cp = real_checkpoint()
            mode = tamper.mode
            if mode == "rollback":
                size, note = upstream.get_cosignatures(cp.size - 1)
                return pb.CheckpointResponse(signed_note=note, size=size)
            if mode in ("fork_same_size", "fork_bigger"):
                size = cp.size if mode == "fork_same_size" else cp.size + 1
                forged = Checkpoint(cp.origin, size, os.urandom(32))
                note = sign_checkpoint(forged, consortium.log_signer())
                return pb.CheckpointResponse(signed_note=note, size=size)
            if mode == "bad_signature":
                other = generate_signer(cp.origin)  # same name, another key
                note = sign_checkpoint(cp, other)
                return pb.CheckpointResponse(signed_note=note, size=cp.size)
            return serde.checkpoint_to_proto(info)

        def GetConsistencyProof(self, request, context):
            if tamper.mode == "fork_bigger":
                return pb.ConsistencyProofResponse(
                    old_size=request.old_size, new_size=request.new_size,
                    hashes=[os.urandom(32) for _ in range(3)],
                )
            return serde.consistency_to_proto(
                upstream.get_consistency_proof(request.old_size, request.new_size)
            )

        def GetInclusionProof(self, request, context):
            which = request.WhichOneof("leaf")
            kw = {which: getattr(request, which)}
            return serde.inclusion_to_proto(
                upstream.get_inclusion_proof(tree_size=request.tree_size, **kw)
            )

        def GetEntries(self, request, context):
            return serde.entries_page_to_proto(upstream.get_entries_page(request.start,
                                                                         request.end))

        def GetBlob(self, request, context):
            data = upstream.get_blob(request.sha256)
            yield pb.BlobChunk(total_size=len(data), offset=0, data=data)

        def GetReference(self, request, context):
            import hashlib

            ref = upstream.get_reference(request.tree_size)
            st = ref.safetensors_bytes
            h = ref.header
            if tamper.mode == "bad_blob":
                st = st[:-1] + bytes([st[-1] ^ 0x01])  # one bit of one weight
            header = pb.ReferenceHeader(
                tree_size=h.tree_size, digest=h.digest, manifest_size=len(ref.manifest_bytes),
                safetensors_size=len(st), manifest_sha256=h.manifest_sha256,
                safetensors_sha256="sha256:" + hashlib.sha256(st).hexdigest(),
            )
            yield pb.ReferenceChunk(part=pb.ReferenceChunk.PART_HEADER, header=header)
            yield pb.ReferenceChunk(part=pb.ReferenceChunk.PART_MANIFEST, offset=0,
                                    data=ref.manifest_bytes)
            yield pb.ReferenceChunk(part=pb.ReferenceChunk.PART_SAFETENSORS, offset=0, data=st)

        def SubmitUpdate(self, request, context):
            tamper.submits.append((bytes(request.envelope), bytes(request.diff)))
            if tamper.mode == "down":
                context.abort(grpc.StatusCode.UNAVAILABLE, "coordinator down (test double)")
            result = upstream.submit_update(bytes(request.envelope), bytes(request.diff))
            tamper.forwarded_submits += 1
            if tamper.mode == "lost_reply":  # it arrived, then the coordinator went away
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost (test double)")
            return serde.submit_result_to_proto(result)

        def GetSiteInfo(self, request, context):
            return serde.site_info_to_proto(upstream.get_site_info(request.site_id))

        def GetCosignatures(self, request, context):
            size, note = upstream.get_cosignatures(request.tree_size)
            if tamper.cosign is not None:
                note = tamper.cosign(note)
            return pb.CosignaturesResponse(tree_size=size, signed_note=note)

        def Health(self, request, context):
            return serde.health_to_proto(upstream.health())

    return Evil()


@dataclass
class EvilCoordinator:
    address: str
    tamper: Tamper


@pytest.fixture(scope="module")
def evil(consortium: Consortium):
    """A malicious coordinator double on loopback (plain text; the site runs with --insecure)."""
    from concurrent import futures

    import grpc

    from protocols.proto import registry_pb2_grpc as pbg

    tamper = Tamper()
    upstream = consortium.client()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pbg.add_RegistryServicer_to_server(_servicer(upstream, tamper, consortium), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield EvilCoordinator(address=f"127.0.0.1:{port}", tamper=tamper)
    finally:
        server.stop(grace=None).wait(5)
        upstream.close()


