"""Safe media through the real stack: types sniffed from the bytes, per-kind limits, chunked
uploads, content stored once per user, DeleteMedia, DeleteCampaign removing only unshared files,
and an image campaign sent through the WAHA sandbox with a spec-valid sendImage body."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from whago_client import AsyncWhagoClient, WhagoClient, errors
from whago_client.cli import main as cli_main

from campaign_service.media_files import Kind, sniff
from devstack.procs import ServiceProcess
from tests.conftest import SANDBOX_API_KEY, IsolatedStack
from tests.helpers import Api, phones, user_id
from waha_sandbox.control import SandboxControl
from waha_sandbox.spec import load_validator
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res

# -- real (minimal) files, built here ---------------------------------------------------------------


def png(extra: bytes = b"") -> bytes:
    """A valid 1x1 PNG (signature, IHDR, IDAT, IEND), with `extra` bytes in a private chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + (chunk(b"prVt", extra) if extra else b"")
            + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b""))


JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"
PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
MP4 = struct.pack(">I", 24) + b"ftypmp42" + b"\x00\x00\x00\x00" + b"isommp42" + struct.pack(">I", 8) + b"free"
OGG = b"OggS\x00\x02" + b"\x00" * 20 + b"\x01\x13" + b"OpusHead\x01\x01\x38\x01\x80\xbb\x00\x00\x00\x00\x00"


def upload(api: Api, campaign_id: str, content: bytes, mime: str = "", name: str = "file") -> res.Media:
    return api.campaigns.UploadMedia(cs.UploadMediaRequest(campaign_id=campaign_id, filename=name, mime_type=mime,
                                                           content=content), metadata=api.md)


def chunks(campaign_id: str, content: bytes, mime: str, size: int, name: str = "big",
           request_id: str = "") -> Iterator[cs.UploadMediaChunksRequest]:
    yield cs.UploadMediaChunksRequest(campaign_id=campaign_id, filename=name, mime_type=mime, request_id=request_id,
                                      content=content[:size])
    for i in range(size, len(content), size):
        yield cs.UploadMediaChunksRequest(content=content[i:i + size])


def refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, list[str], str]:
    """(code, BadRequest field names, details) of a call that must fail."""
    try:
        call()
    except grpc.RpcError as err:
        fields: list[str] = []
        st = rpc_status.from_call(err)  # type: ignore[arg-type]
        for d in st.details if st is not None else []:
            br = error_details_pb2.BadRequest()
            if d.Unpack(br):
                fields += [v.field for v in br.field_violations]
        return err.code(), fields, err.details() or ""
    raise AssertionError("the call succeeded but should have failed")


def user_files(media: Path, uid: object) -> list[Path]:
    """Every file (temp files included) under the user's media directory."""
    root = media / "u" / str(uid)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture()
def media_dir(workdir: Path) -> Path:
    return workdir / "media"


def media_rows(engine: sa.Engine, campaign_id: str) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.text("SELECT count(*) FROM campaign_media WHERE campaign_id = :c"),
                             {"c": campaign_id}).scalar_one())


@pytest.fixture()
def target(stack: dict[str, ServiceProcess], ports: dict[str, int]) -> str:
    return f"127.0.0.1:{ports['campaign']}"


@pytest.fixture()
def engine(database_url: str) -> Iterator[sa.Engine]:
    e = sa.create_engine(database_url)
    yield e
    e.dispose()


# -- sniffing (unit: the rules) ---------------------------------------------------------------------

@pytest.mark.parametrize(("content", "declared", "mime", "kind"), [
    (png(), "image/png", "image/png", Kind.IMAGE),
    (JPEG, "image/jpg", "image/jpeg", Kind.IMAGE),
    (PDF, "application/pdf", "application/pdf", Kind.DOCUMENT),
    (MP4, "video/mp4", "video/mp4", Kind.VIDEO),
    (OGG, "audio/ogg; codecs=opus", "audio/ogg", Kind.AUDIO),
    (MP4, "audio/mp4", "audio/mp4", Kind.AUDIO),  # same container, declared as audio
    (png(), "", "image/png", Kind.IMAGE),  # nothing declared: the bytes decide
    ("olá, mundo\n".encode(), "text/plain", "text/plain", Kind.DOCUMENT),
    (b"a,b\n1,2\n", "", "text/csv", Kind.DOCUMENT),  # text: by the file name
])
def test_sniffing_recognises_real_files(content: bytes, declared: str, mime: str, kind: Kind) -> None:
    assert sniff(content, declared, "list.csv" if not declared else "f") == (mime, kind)


# -- sniffing through the RPCs ------------------------------------------------------------------------

def test_uploads_store_the_sniffed_type_and_kind(api: Api) -> None:
    c = api.campaign([])
    got = {m.mime_type: m.kind for m in (upload(api, c.id, png(), "image/png"), upload(api, c.id, JPEG, "image/jpeg"),
                                        upload(api, c.id, PDF, "application/pdf"), upload(api, c.id, MP4, "video/mp4"),
                                        upload(api, c.id, OGG, "audio/ogg"))}
    assert got == {"image/png": res.MEDIA_KIND_IMAGE, "image/jpeg": res.MEDIA_KIND_IMAGE,
                   "application/pdf": res.MEDIA_KIND_DOCUMENT, "video/mp4": res.MEDIA_KIND_VIDEO,
                   "audio/ogg": res.MEDIA_KIND_AUDIO}
    m = upload(api, c.id, png())
    assert m.mime_type == "image/png" and len(m.sha256) == 64


@pytest.mark.parametrize(("content", "declared", "field"), [
    (PDF, "image/png", "mime_type"),          # a PDF pretending to be an image
    (JPEG, "image/png", "mime_type"),         # the wrong image type
    (b"MZ\x90\x00" + b"\x00" * 60, "application/pdf", "mime_type"),  # fake PDF
    (b"just some bytes", "image/jpeg", "mime_type"),
    (b"\x00\x01\x02binary", "", "content"),   # unrecognisable, nothing declared
    (b"\x7fELF\x02\x01\x01" + b"\x00" * 60, "application/x-executable", "content"),  # a program
    (b"", "image/png", "content"),
])
def test_fake_and_mismatched_types_are_refused_and_nothing_is_stored(
        api: Api, api_key: str, engine: sa.Engine, media_dir: Path, content: bytes, declared: str,
        field: str) -> None:
    c = api.campaign([])
    code, fields, details = refused(lambda: upload(api, c.id, content, declared))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field]), details
    assert media_rows(engine, c.id) == 0 and user_files(media_dir, user_id(engine, api_key)) == []


# -- limits -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_limits(isolated_stack: Callable[..., IsolatedStack]) -> Iterator[IsolatedStack]:
    """A stack whose limits are tiny (image 2 KiB, video 3 KiB, audio 3 KiB, document 64 KiB)."""
    with isolated_stack("media-limits", workers=0, WHAGO_MEDIA_MAX_IMAGE_BYTES="2048",
                        WHAGO_MEDIA_MAX_VIDEO_BYTES="3072", WHAGO_MEDIA_MAX_AUDIO_BYTES="3072",
                        WHAGO_MEDIA_MAX_DOCUMENT_BYTES=str(64 * 1024)) as st:
        yield st


def test_per_kind_limits_unary_and_streamed(small_limits: IsolatedStack, create_user: Callable[..., str],
                                            engine: sa.Engine, media_dir: Path) -> None:
    key = create_user()
    api = Api(small_limits.campaign_channel, key)
    c = api.campaign([])
    assert upload(api, c.id, png(b"x" * 1500), "image/png").kind == res.MEDIA_KIND_IMAGE  # under 2 KiB
    code, fields, details = refused(lambda: upload(api, c.id, png(b"x" * 2100), "image/png"))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["content"]) and "2048 bytes" in details
    # the same bytes as a document would fit: the limit follows the sniffed kind, not a declared one
    assert refused(lambda: upload(api, c.id, PDF + b"%" * 70_000, "application/pdf"))[1] == ["content"]
    big_pdf = PDF + b"%" * 40_000
    assert upload(api, c.id, big_pdf, "application/pdf").size_bytes == len(big_pdf)
    # streamed: refused as the stream crosses the limit; no row, no partial file
    over = PDF + b"%" * 200_000
    code, fields, details = refused(lambda: api.campaigns.UploadMediaChunks(
        chunks(c.id, over, "application/pdf", 4096), metadata=api.md))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["content"]), details
    assert "document files are limited to" in details
    assert media_rows(engine, c.id) == 2
    uid = user_id(engine, key)
    assert len(user_files(media_dir, uid)) == 2 and not any(p.name.startswith(".") for p in user_files(media_dir, uid))


# -- chunked upload -----------------------------------------------------------------------------------

def test_chunked_upload_streams_to_disk_with_its_sha256(api: Api, api_key: str, engine: sa.Engine,
                                                        media_dir: Path) -> None:
    c = api.campaign([])
    content = PDF + bytes(range(256)) * 20_000  # ~5 MiB in 64 KiB chunks
    m = api.campaigns.UploadMediaChunks(chunks(c.id, content, "application/pdf", 64 * 1024, name="report.pdf"),
                                        metadata=api.md)
    assert (m.filename, m.mime_type, m.kind, m.size_bytes) == ("report.pdf", "application/pdf",
                                                               res.MEDIA_KIND_DOCUMENT, len(content))
    assert m.sha256 == hashlib.sha256(content).hexdigest()
    [stored] = user_files(media_dir, user_id(engine, api_key))
    assert stored.name == m.sha256 and stored.read_bytes() == content
    # sniffing works across chunks smaller than its window, and a mismatch is found in the stream
    tiny = api.campaigns.UploadMediaChunks(chunks(c.id, png(b"y" * 20_000), "image/png", 7), metadata=api.md)
    assert tiny.kind == res.MEDIA_KIND_IMAGE
    code, fields, _ = refused(lambda: api.campaigns.UploadMediaChunks(chunks(c.id, content, "video/mp4", 1000),
                                                                      metadata=api.md))
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["mime_type"])
    assert media_rows(engine, c.id) == 2
    # request_id: a retried stream returns the first result, stores nothing twice
    again = [api.campaigns.UploadMediaChunks(chunks(c.id, JPEG, "image/jpeg", 8, request_id="up-1"),
                                             metadata=api.md) for _ in range(2)]
    assert again[0] == again[1] and media_rows(engine, c.id) == 3


def test_chunked_upload_into_a_running_campaign_or_unknown_one_is_refused(api: Api, sandbox_url: str) -> None:
    chip = api.chip(sandbox_url, SANDBOX_API_KEY, interval=(3600.0, 3600.0))
    c = api.campaign([chip])
    api.import_phones(c.id, phones(2))  # the second waits an hour: RUNNING
    api.start(c.id)
    code, _, _ = refused(lambda: api.campaigns.UploadMediaChunks(chunks(c.id, PDF, "application/pdf", 16),
                                                                 metadata=api.md))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _, _ = refused(lambda: api.campaigns.UploadMediaChunks(
        chunks("00000000-0000-0000-0000-000000000000", PDF, "application/pdf", 16), metadata=api.md))
    assert code == grpc.StatusCode.NOT_FOUND
    api.cancel(c.id)


# -- dedup, DeleteMedia, DeleteCampaign ----------------------------------------------------------------

def test_same_content_is_stored_once_per_user(api: Api, api_key: str, create_user: Callable[..., str],
                                              campaign_channel: grpc.Channel, engine: sa.Engine,
                                              media_dir: Path) -> None:
    a, b = api.campaign([]), api.campaign([])
    m1, m2 = upload(api, a.id, png(), "image/png"), upload(api, b.id, png(), "image/png", name="again.png")
    m3 = api.campaigns.UploadMediaChunks(chunks(a.id, png(), "image/png", 10), metadata=api.md)
    assert len({m1.id, m2.id, m3.id}) == 3 and m1.sha256 == m2.sha256 == m3.sha256
    assert [p.name for p in user_files(media_dir, user_id(engine, api_key))] == [m1.sha256]
    other_key = create_user()
    other = Api(campaign_channel, other_key)
    upload(other, other.campaign([]).id, png(), "image/png")  # another user: a file of their own
    assert [p.name for p in user_files(media_dir, user_id(engine, other_key))] == [m1.sha256]


def test_delete_media_only_while_editable_and_not_in_use(api: Api, api_key: str, engine: sa.Engine,
                                                         media_dir: Path, sandbox_url: str) -> None:
    uid = user_id(engine, api_key)
    a, b = api.campaign([]), api.campaign([])
    ma, mb = upload(api, a.id, JPEG, "image/jpeg"), upload(api, b.id, JPEG, "image/jpeg")

    def delete(c: res.Campaign, m: res.Media, rid: str = "") -> cs.DeleteMediaResponse:
        return api.campaigns.DeleteMedia(cs.DeleteMediaRequest(campaign_id=c.id, media_id=m.id, request_id=rid),
                                         metadata=api.md)

    out = delete(a, ma, "del-1")
    assert (out.media_id, out.file_deleted) == (ma.id, False)  # campaign b still uses the content
    assert delete(a, ma, "del-1") == out  # replayed
    assert len(user_files(media_dir, uid)) == 1
    assert refused(lambda: delete(a, ma))[0] == grpc.StatusCode.NOT_FOUND
    # used by a template: refused, nothing changed
    api.campaigns.UpdateCampaign(cs.UpdateCampaignRequest(
        campaign=res.Campaign(id=b.id, templates=[res.MessageTemplate(text="hi", media_id=mb.id)]),
        update_mask=field_mask_pb2.FieldMask(paths=["templates"])), metadata=api.md)
    code, _, details = refused(lambda: delete(b, mb))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "templates[0]" in details
    # RUNNING: refused by the lifecycle table
    chip = api.chip(sandbox_url, SANDBOX_API_KEY, interval=(3600.0, 3600.0))
    api.campaigns.UpdateCampaign(cs.UpdateCampaignRequest(
        campaign=res.Campaign(id=b.id, templates=[res.MessageTemplate(text="hi")], chip_ids=[chip.id]),
        update_mask=field_mask_pb2.FieldMask(paths=["templates", "chip_ids"])), metadata=api.md)
    api.import_phones(b.id, phones(2))  # the second waits an hour: RUNNING
    api.start(b.id)
    code, _, details = refused(lambda: delete(b, mb))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "RUNNING" in details
    api.cancel(b.id)
    assert refused(lambda: delete(b, mb))[0] == grpc.StatusCode.FAILED_PRECONDITION  # CANCELLED too
    # the last user of the content in a DRAFT: the file goes
    c = api.campaign([])
    mc = upload(api, c.id, PDF, "application/pdf")
    assert delete(c, mc).file_deleted is True
    assert [p.name for p in user_files(media_dir, uid)] == [mb.sha256]


def test_delete_campaign_removes_only_files_no_other_campaign_uses(api: Api, api_key: str, engine: sa.Engine,
                                                                   media_dir: Path) -> None:
    uid = user_id(engine, api_key)
    a, b = api.campaign([]), api.campaign([])
    shared = upload(api, a.id, png(), "image/png")
    upload(api, b.id, png(), "image/png")
    own = upload(api, a.id, PDF, "application/pdf")
    upload(api, a.id, PDF, "application/pdf", name="twice.pdf")  # the same content twice in one campaign
    out = api.campaigns.DeleteCampaign(cs.DeleteCampaignRequest(campaign_id=a.id), metadata=api.md)
    assert (out.deleted_media, out.deleted_media_files) == (3, 1)
    assert [p.name for p in user_files(media_dir, uid)] == [shared.sha256]
    assert own.sha256 != shared.sha256
    out = api.campaigns.DeleteCampaign(cs.DeleteCampaignRequest(campaign_id=b.id), metadata=api.md)
    assert (out.deleted_media, out.deleted_media_files) == (1, 1)
    assert user_files(media_dir, uid) == []


# -- the send ------------------------------------------------------------------------------------------

def test_image_campaign_is_sent_with_send_image_and_a_spec_valid_body(api: Api, sandbox_url: str,
                                                                     control: SandboxControl) -> None:
    chip = api.chip(sandbox_url, SANDBOX_API_KEY)
    c = api.campaign([chip])
    image = png(b"campaign picture")
    m = upload(api, c.id, image, "image/png", name="promo.png")
    doc = upload(api, c.id, PDF, "application/pdf", name="terms.pdf")
    api.campaigns.UpdateCampaign(cs.UpdateCampaignRequest(
        campaign=res.Campaign(id=c.id, templates=[res.MessageTemplate(text="Olá {{name}}", media_id=m.id),
                                                  res.MessageTemplate(text="terms", media_id=doc.id)]),
        update_mask=field_mask_pb2.FieldMask(paths=["templates"])), metadata=api.md)
    api.import_phones(c.id, phones(4))
    api.start(c.id)
    assert api.wait_final(c.id).state == res.CAMPAIGN_STATE_COMPLETED
    sends = control.sends(session=chip.waha_session)
    assert sorted(s["path"] for s in sends).count("/api/sendImage") >= 1
    assert {s["path"] for s in sends} <= {"/api/sendImage", "/api/sendFile"} and len(sends) == 4
    validator = load_validator()
    for s in sends:
        body = s["body"]
        schema = "MessageImageRequest" if s["path"] == "/api/sendImage" else "MessageFileRequest"
        assert validator.validate(schema, body) == []
        if s["path"] == "/api/sendImage":
            assert body["file"]["mimetype"] == "image/png" and body["file"]["filename"] == "promo.png"
            assert base64.b64decode(body["file"]["data"]) == image and body["caption"].startswith("Olá")
        else:
            assert body["file"]["mimetype"] == "application/pdf"
            assert base64.b64decode(body["file"]["data"]) == PDF


def test_the_sandbox_refuses_a_media_body_the_spec_does_not_allow(sandbox_url: str, control: SandboxControl
                                                                   ) -> None:
    control.set_session("media-spec")
    bad = {"session": "media-spec", "chatId": "5511999999999@c.us", "file": {"filename": "a.png"}}  # no data
    req = urllib.request.Request(f"{sandbox_url}/api/sendImage", data=json.dumps(bad).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "X-Api-Key": SANDBOX_API_KEY})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400


# -- the SDKs and the CLI --------------------------------------------------------------------------

def test_sdks_stream_a_large_file_in_chunks_then_list_and_delete_it(
        api: Api, api_key: str, engine: sa.Engine, media_dir: Path, tmp_path: Path, target: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A 20 MiB document is more than one UploadMedia may carry: the SDK streams it from the path."""
    c = api.campaign([])
    path = tmp_path / "catalogue.pdf"
    big = PDF + bytes(range(256)) * (20 * 4096)
    path.write_bytes(big)
    with WhagoClient(target, api_key=api_key) as client:
        m = client.upload_media(c.id, path)
        assert (m.filename, m.mime_type, m.size_bytes, m.sha256) == (
            "catalogue.pdf", "application/pdf", len(big), hashlib.sha256(big).hexdigest())
        small = client.upload_media(c.id, JPEG, "a.jpg")  # bytes: one UploadMedia
        assert {x.id for x in client.list_media(c.id)} == {m.id, small.id}
        with pytest.raises(errors.InvalidArgument) as e:  # bytes over 16 MiB: refused before sending
            client.upload_media(c.id, big, "x.pdf")
        assert e.value.field_violations and e.value.field_violations[0][0] == "content"
        assert client.delete_media(c.id, m.id).file_deleted is True
        with pytest.raises(errors.NotFound):
            client.delete_media(c.id, m.id)

    async def via_aio() -> tuple[res.Media, cs.DeleteMediaResponse]:
        async with AsyncWhagoClient(target, api_key=api_key) as client:
            got = await client.upload_media(c.id, path)
            return got, await client.delete_media(c.id, got.id)

    got, gone = asyncio.run(via_aio())
    assert got.size_bytes == len(big) and gone.media_id == got.id
    assert [p.name for p in user_files(media_dir, user_id(engine, api_key))] == [small.sha256]

    common = ["--target", target, "--api-key", api_key]
    capsys.readouterr()
    assert cli_main([*common, "--json", "campaigns", "upload", c.id, str(path)]) == 0
    uploaded = json.loads(capsys.readouterr().out)
    assert cli_main([*common, "--json", "campaigns", "media", c.id]) == 0
    assert {x["id"] for x in json.loads(capsys.readouterr().out)} == {uploaded["id"], small.id}
    assert cli_main([*common, "campaigns", "delete-media", c.id, uploaded["id"]]) == 0
    assert f"deleted media {uploaded['id']}" in capsys.readouterr().out
    assert [x.id for x in api.campaigns.ListCampaignMedia(cs.ListCampaignMediaRequest(campaign_id=c.id),
                                                          metadata=api.md).media] == [small.id]
