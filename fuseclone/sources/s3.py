"""An S3 object as a source: `s3://BUCKET/KEY`, read with the HTTP source's machinery (Range
GETs on pooled connections, If-Match on the ETag) and signed with AWS Signature V4 by botocore.

    async with open_s3_source("s3://images/golden/debian.raw") as source:
        data = await source.read(offset, length)

Settings are the AWS SDKs' own, resolved by botocore's session (imported only here: it costs
~0.2 s, which no other source pays): credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws/credentials, ~/.aws/config (credential_process, SSO,
assume-role...), container or instance roles; the region from AWS_REGION, AWS_DEFAULT_REGION or
the profile (default us-east-1); the endpoint from AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or the
profile's endpoint_url (Ceph RGW, MinIO, SeaweedFS...), else AWS's regional endpoint.
Addressing: virtual-hosted (https://BUCKET.s3.REGION.amazonaws.com/KEY) on AWS for bucket names
that allow it, path-style (ENDPOINT/BUCKET/KEY) for other endpoints; the profile's
`s3 = addressing_style = path|virtual` overrides.

Credentials that expire (a session from credential_process, SSO or a role) are refreshed by
botocore: every request is signed with the credentials current when it is sent. Without any
credentials requests go unsigned (public objects).

Identity (stored in META): kind "s3", bucket, key, size and ETag; never the endpoint or a
credential. A META made for one version of an object is refused for another (the ETag changes
when the object is replaced), and reads carry If-Match, so a replacement during a run fails them.

Opening sends one signed `GET Range: bytes=0-0` (its answer gives the size, ETag and Range
support; an error answer's body names the cause, which a HEAD answer cannot): wrong
credentials, a missing bucket or key, or a server without Range support each give one
SourceError line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import quote, urlsplit

import httpx

from ..errors import SourceError
from ..threads import in_thread
from .http import HeaderFile, HttpSource, RequestAuth, serving

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
# Bytes per GET: each request costs a signature and a round trip through the store's gateway,
# so a hydration copy (4 MiB) is one request, as boto3 fetches 8 MiB parts (HTTP: 1 MiB).
PIECE_SIZE = 4 << 20
ERROR_BODY_LIMIT = 64 << 10  # bytes of an error answer read to find its <Code>
# Headers that take part in the signature besides host and x-amz-*: the ones our requests set.
SIGNED_HEADERS = ("range", "if-match", "if-unmodified-since")
# A bucket name that can be a DNS label under a TLS wildcard certificate (no dots).
_VIRTUAL_HOST_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")

# botocore logs canonical requests at DEBUG, which carry X-Amz-Security-Token (a secret).
logging.getLogger("botocore").setLevel(logging.INFO)


@dataclass(frozen=True)
class S3Object:
    bucket: str
    key: str

    @classmethod
    def parse(cls, spec: str) -> S3Object:
        parts = urlsplit(spec)
        bucket, key = parts.netloc, parts.path.lstrip("/")
        if parts.scheme.lower() != "s3" or not bucket or not key or parts.query or parts.fragment:
            raise SourceError(f"{spec}: not an S3 object URL (expected s3://BUCKET/KEY)")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class AwsSettings:
    """What the AWS configuration says: credentials (botocore's object, refreshable or not, or
    None), region, endpoint and addressing style."""

    credentials: object | None
    region: str
    endpoint: str | None
    addressing_style: str  # "auto", "path" or "virtual"

    @classmethod
    def load(cls) -> AwsSettings:
        """Resolve the settings as the AWS SDKs do (blocking: files, maybe a process or an
        instance-metadata request). One SourceError line if the configuration is unusable."""
        import botocore.exceptions
        import botocore.session
        from botocore.configprovider import ConfiguredEndpointProvider

        try:
            session = botocore.session.Session()
            scoped = session.get_scoped_config()
            credentials = session.get_credentials()
            region = (os.environ.get("AWS_REGION") or session.get_config_variable("region")
                      or DEFAULT_REGION)
            endpoint = None
            if not session.get_config_variable("ignore_configured_endpoint_urls"):
                endpoint = ConfiguredEndpointProvider(session.full_config, scoped, "s3").provide()
        except botocore.exceptions.BotoCoreError as exc:
            raise SourceError(f"AWS configuration: {exc}") from None
        style = str((scoped.get("s3") or {}).get("addressing_style", "auto")).lower()
        return cls(credentials, region, endpoint, style)

    def object_url(self, obj: S3Object) -> httpx.URL:
        """Where `obj` is read: virtual-hosted on AWS where the bucket name allows, else
        path-style under the configured endpoint."""
        key = quote(obj.key, safe="/~")
        if self.endpoint is None:
            base = f"https://s3.{self.region}.amazonaws.com"
            virtual = self.addressing_style != "path" and _VIRTUAL_HOST_BUCKET.match(obj.bucket)
        else:
            base = self.endpoint.rstrip("/")
            virtual = self.addressing_style == "virtual"
        if virtual:
            scheme, rest = base.split("://", 1)
            return httpx.URL(f"{scheme}://{obj.bucket}.{rest}/{key}")
        return httpx.URL(f"{base}/{quote(obj.bucket, safe='')}/{key}")


class SigV4Signer:
    """Signs each request with the credentials current at that moment (botocore refreshes
    expiring ones; a refresh that may block runs in a worker thread)."""

    def __init__(self, credentials, region: str) -> None:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        self._credentials = credentials
        self._region = region
        self._auth_class = S3SigV4Auth
        self._request_class = AWSRequest

    async def __call__(self, request: httpx.Request) -> None:
        frozen = await self._current_credentials()
        signed = self._request_class(
            method=request.method, url=str(request.url),
            headers={name: request.headers[name] for name in SIGNED_HEADERS
                     if name in request.headers})
        self._auth_class(frozen, "s3", self._region).add_auth(signed)
        for name, value in signed.headers.items():
            if name.lower() == "authorization" or name.lower().startswith("x-amz-"):
                request.headers[name] = value

    async def _current_credentials(self):
        import botocore.exceptions

        creds = self._credentials
        try:
            if getattr(creds, "refresh_needed", lambda: False)():
                return await in_thread(creds.get_frozen_credentials)
            return creds.get_frozen_credentials()
        except botocore.exceptions.BotoCoreError as exc:
            # Surfaces as a failed read (EIO, hydration backs off) with this reason.
            raise httpx.RequestError(f"the AWS credentials could not be refreshed: {exc}") \
                from None


class S3Source(HttpSource):
    """An object in an S3 bucket. Open with open_s3_source."""

    probe_with_head = False

    def __init__(self, *args, obj: S3Object, region: str, signed: bool, **kwargs) -> None:
        super().__init__(*args, canonical=str(obj), **kwargs)
        self.object = obj
        self._region = region
        self._signed = signed

    def own_identity(self) -> dict[str, str | int]:
        ident: dict[str, str | int] = {"kind": "s3", "bucket": self.object.bucket,
                                       "key": self.object.key, "size": self.size}
        if self.etag is not None:
            ident["etag"] = self.etag
        return ident

    def same_identity(self, stored: dict, current: dict) -> bool:
        return stored == current

    async def _refusal(self, response: httpx.Response) -> str:
        code, message = await _error_of(response)
        status = f"HTTP {response.status_code}"
        if code == "NoSuchBucket":
            return f"no such bucket {self.object.bucket!r} ({status} {code})"
        if code == "NoSuchKey" or (code is None and response.status_code == 404):
            return f"no such key {self.object.key!r} in bucket {self.object.bucket!r} ({status})"
        region = response.headers.get("x-amz-bucket-region")
        if region and region != self._region:
            return f"the bucket is in region {region}, not {self._region}: set AWS_REGION={region}"
        if response.status_code in (401, 403):
            why = f"{code}: {message}" if code and message else (code or "access denied")
            hint = ("check the AWS credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                    "AWS_PROFILE)") if self._signed else (
                    "no AWS credentials were found: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
            return f"access denied ({status} {why}); {hint}"
        detail = f" {code}: {message}" if code else ""
        return f"{status}{detail}"


async def _error_of(response: httpx.Response) -> tuple[str | None, str | None]:
    """The <Code> and <Message> of an S3 error answer (None where it has none)."""
    body = bytearray()
    with contextlib.suppress(httpx.HTTPError):
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > ERROR_BODY_LIMIT:
                break
    try:
        root = ElementTree.fromstring(bytes(body))
    except ElementTree.ParseError:
        return None, None
    return root.findtext("Code"), root.findtext("Message")


@contextlib.asynccontextmanager
async def open_s3_source(spec: str, *, header_file: str | None = None,
                         **tuning) -> AsyncIterator[S3Source]:
    """Open the object `spec` (s3://BUCKET/KEY) for the duration of the block. `header_file`
    adds headers to every request (a gateway's API key, say); `tuning` as for HTTP."""
    obj = S3Object.parse(spec)
    headers = await HeaderFile.load(header_file) if header_file else None
    if headers is not None and any(n.lower() == "authorization" for n in headers.headers):
        raise SourceError(f"{header_file}: an Authorization header cannot be sent to S3 "
                          "(requests carry their own signature)")
    try:
        settings = await in_thread(AwsSettings.load)
    except SourceError as exc:
        raise SourceError(f"{obj}: {exc}") from None
    if settings.credentials is None:
        log.warning("%s: no AWS credentials found; requests go unsigned", obj)
    signer = SigV4Signer(settings.credentials, settings.region) if settings.credentials else None
    auth = RequestAuth(headers, signer) if headers or signer else None
    tuning.setdefault("piece_size", PIECE_SIZE)
    async with serving(S3Source, settings.object_url(obj), str(obj), auth, obj=obj,
                       region=settings.region, signed=signer is not None,
                       **tuning) as source:
        yield source
