"""The fetch guard. Its decisions about private, link-local and metadata addresses are tested as
units with the resolver's answer given by the test: no packet goes to such an address. The
end-to-end tests use loopback targets outside the allow-list and a canary that must hear nothing."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from smi.fetch import FetchPolicy, FetchRefused, address_problem, check, guarded_stream
from smi.serve import ServerThread
from smi.settings import Settings
from tests.conftest import png_bytes
from tests.helpers import order


def resolving_to(*addresses: str):
    async def resolver(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolver


PUBLIC = FetchPolicy(resolver=resolving_to("93.184.216.34"))


@pytest.mark.parametrize(
    "address, problem",
    [
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fd00::1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("0.0.0.0", "private"),
        ("224.0.0.1", "public"),
        ("100.64.0.1", "public"),
    ],
)
def test_non_public_addresses_are_named(address, problem):
    assert problem in address_problem(address)


def test_public_addresses_pass():
    assert address_problem("93.184.216.34") is None
    assert address_problem("2606:2800:220:1:248:1893:25c8:1946") is None


@pytest.mark.parametrize("answer", [["10.0.0.1"], ["169.254.169.254"], ["fd00::1"], ["93.184.216.34", "127.0.0.1"]])
async def test_a_name_resolving_to_a_private_address_is_refused(answer):
    policy = FetchPolicy(resolver=resolving_to(*answer))
    with pytest.raises(FetchRefused, match="resolves to"):
        await check("https://images.example/cat.png", policy)


async def test_literal_addresses_and_schemes_and_ports():
    for url in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://[fd00::1]/x"):
        with pytest.raises(FetchRefused):
            await check(url, PUBLIC)
    for url in ("file:///etc/passwd", "ftp://images.example/cat.png", "gopher://x/"):
        with pytest.raises(FetchRefused, match="only http and https"):
            await check(url, PUBLIC)
    with pytest.raises(FetchRefused, match="port 8080"):
        await check("http://images.example:8080/cat.png", PUBLIC)
    target, address = await check("https://images.example/cat.png", PUBLIC)
    assert address == "93.184.216.34" and target.host == "images.example"


async def test_allow_list_and_result_hosts():
    policy = FetchPolicy.parse("127.0.0.1:8100,internal.shop", "upsampler.com,.upsampler.com,127.0.0.1:8100")
    assert (await check("http://127.0.0.1:8100/cdn/x.png", policy))[1] is None
    with pytest.raises(FetchRefused, match="not one of the hosts"):
        await check("http://127.0.0.1:8101/cdn/x.png", policy)
    with pytest.raises(FetchRefused, match="not one of the hosts"):
        await check("https://evil.example/x.png", FetchPolicy.parse("", "upsampler.com,.upsampler.com"))
    cdn = FetchPolicy(only_hosts=frozenset({".upsampler.com"}), resolver=resolving_to("93.184.216.34"))
    assert (await check("https://cdn.upsampler.com/r.png", cdn))[1] == "93.184.216.34"
    with pytest.raises(FetchRefused):
        await check("https://upsampler.com.evil.example/r.png", cdn)


@pytest.fixture
def canary():
    """A loopback server outside every allow-list: it must never receive a request."""
    hits: list[str] = []
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "HEAD", "POST"])
    def anything(path: str, request: Request):
        hits.append(f"{request.method} /{path}")
        return Response(png_bytes(20, 20), media_type="image/png")

    with ServerThread(app) as server:
        server.hits = hits
        yield server


@pytest.fixture
def redirector(canary):
    """An allow-listed host that redirects to the canary."""
    app = FastAPI()

    @app.get("/img.png")
    def to_canary():
        return RedirectResponse(f"{canary.url}/stolen.png", status_code=302)

    with ServerThread(app) as server:
        yield server


async def test_redirect_to_a_port_outside_the_allow_list_is_refused(canary, redirector):
    policy = FetchPolicy.parse(redirector.url.split("//")[1])
    async with httpx.AsyncClient() as client:
        with pytest.raises(FetchRefused):
            async with guarded_stream(client, f"{redirector.url}/img.png", policy):
                pass
    assert canary.hits == []


async def test_storefront_urls_the_guard_refuses_start_nothing(dev_env, stack_factory, canary, redirector, shop):
    allowed = ",".join(server.url.split("//")[1] for server in (redirector, shop))  # not the canary
    stack = stack_factory(dev_env, fetch_allow_hosts=allowed)
    client = stack.client()
    for n, url in enumerate(
        [
            f"{canary.url}/img.png",  # a loopback port outside the list
            f"http://localhost:{canary.port}/img.png",  # the same by name
            f"{redirector.url}/img.png",  # an allowed host that redirects there
        ]
    ):
        reply = await asyncio.to_thread(client.post, "/v1/jobs", json=order(url, f"ssrf-{n}"))
        assert reply.status_code == 422, url
        assert reply.json()["error"]["code"] == "url_refused", url
        quote = await asyncio.to_thread(client.post, "/v1/quotes", json={"image_url": url, "scale_factor": 2})
        assert quote.status_code == 422, url
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/img.png"):
        assert (await asyncio.to_thread(client.post, "/v1/jobs", json=order(url, "ssrf-scheme"))).status_code == 422
    assert canary.hits == []
    admin = httpx.get(f"{stack.api.url}/v1/admin/jobs", headers={"Authorization": "Bearer test-admin-key"})
    assert admin.json()["jobs"] == []
    # The allowed shop itself still works.
    fine = await asyncio.to_thread(
        client.post, "/v1/quotes", json={"image_url": stack.shop.publish(png_bytes(8, 8)), "scale_factor": 2}
    )
    assert fine.status_code == 200


async def test_hostile_images_are_refused_before_anything_starts(dev_env, stack_factory):
    import io

    from PIL import Image

    stack = stack_factory(dev_env)
    client = stack.client()
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")  # 400 megapixels in a few dozen kilobytes
    cases = {
        "decompression bomb": (bomb.getvalue(), "output_too_large"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9000" height="9000"/>', "unsupported_format"),
        "zero bytes": (b"", "unsupported_format"),
        "gif": (_gif(), "unsupported_format"),
        "text named png": (b"hello, I am not a picture" * 100, "unsupported_format"),
    }
    for name, (data, code) in cases.items():
        reply = await asyncio.to_thread(
            client.post, "/v1/jobs", json=order(stack.shop.publish(data), f"hostile-{len(name)}")
        )
        assert reply.status_code == 422, name
        assert reply.json()["error"]["code"] == code, name
    admin = httpx.get(f"{stack.api.url}/v1/admin/jobs", headers={"Authorization": "Bearer test-admin-key"})
    assert admin.json()["jobs"] == []
    assert not (stack.settings.storage_dir / "jobs").exists()


def _gif() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (10, 10)).save(out, "GIF")
    return out.getvalue()


# Addresses that carry an IPv4 address inside an IPv6 one are judged by the IPv4 address they carry.
@pytest.mark.parametrize(
    "address, problem",
    [
        ("2002:a9fe:a9fe::", "link-local"),  # 6to4 of 169.254.169.254
        ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:a00:1::", "private"),  # 6to4 of 10.0.0.1
        ("2001:0:4136:e378:8000:ffff:80ff:fffe", "loopback"),  # Teredo, client 127.0.0.1
        ("2001:0:a9fe:a9fe:8000:ffff:a247:27dd", "link-local"),  # Teredo, server 169.254.169.254
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
        ("64:ff9b::c0a8:101", "private"),  # NAT64 of 192.168.1.1
        ("::7f00:1", "loopback"),  # IPv4-compatible 127.0.0.1 (deprecated)
        ("::a9fe:a9fe", "link-local"),  # IPv4-compatible 169.254.169.254
        ("fec0::1", "site-local"),  # deprecated, but routed inside sites that still use it
        ("fed0:1:2::3", "site-local"),
    ],
)
def test_ipv6_addresses_carrying_a_private_one_are_named(address, problem):
    assert problem in (address_problem(address) or "public")


@pytest.mark.parametrize(
    "address, public",
    [
        ("2002:5db8:d822::1", True),  # 6to4 of a public address: routed like one
        ("64:ff9b::5db8:d822", True),  # NAT64 of a public address: what DNS64 answers on IPv6-only networks
        ("2001:0:4136:e378:8000:ffff:a247:27dd", False),  # Teredo: not globally reachable, even between public ends
        ("::5db8:d822", False),  # IPv4-compatible: deprecated, never routed
        ("64:ff9b:1::5db8:d822", False),  # the local-use NAT64 prefix: whatever the site makes of it
    ],
)
def test_ipv6_addresses_carrying_a_public_one(address, public):
    assert (address_problem(address) is None) == public


@pytest.mark.parametrize("url", ["http://[2002:a9fe:a9fe::]/", "http://[fec0::1]/", "http://[64:ff9b::7f00:1]/"])
async def test_6to4_nat64_and_site_local_literals_are_refused(url):
    with pytest.raises(FetchRefused):
        await check(url, FetchPolicy(resolver=no_lookup))


async def test_a_name_resolving_to_6to4_of_metadata_is_refused():
    with pytest.raises(FetchRefused, match="link-local"):
        await check("https://images.example/cat.png", FetchPolicy(resolver=resolving_to("2002:a9fe:a9fe::")))


async def no_lookup(host: str, port: int) -> list[str]:
    raise AssertionError(f"{host} was looked up: the guard should have refused it before")


@pytest.mark.parametrize(
    "url",
    [
        "http://0177.0.0.1/",  # octal: 127.0.0.1 to inet_aton, an error to httpx
        "http://127.0.0.01/",
        "http://0177.0.0.1:8100/img.png",
        "http://xn--/",  # idna raises its own error, not httpx's
        "http://①②⑦.0.0.1/",
        "http://[::1/",
        "http://[fe80::1%25eth0/",
    ],
)
async def test_unparsable_urls_are_refused_not_raised(url):
    with pytest.raises(FetchRefused, match="cannot be parsed"):
        await check(url, FetchPolicy(resolver=no_lookup))


@pytest.mark.parametrize(
    "url",
    [
        "http://0x7f.1/",  # 127.0.0.1 to inet_aton (and so to getaddrinfo): hex, and short forms
        "http://2130706433/",
        "http://127.1/",
        "http://0x7f000001/",
        "http://017700000001/",
        "http://0x7f.0.0.1/",
        "http://0/",
        "http://1.2.3.4.5/",  # a name by DNS's rules, an IPv4 address by the URL standard's
        "http://images.example.123/",
        "http://0x7f.1:8100/",
    ],
)
async def test_ipv4_addresses_in_unusual_spellings_are_refused_before_any_lookup(url):
    with pytest.raises(FetchRefused, match="four decimal numbers"):
        await check(url, FetchPolicy(resolver=no_lookup))


@pytest.mark.parametrize("url", ["http://exa mple.com/", "http://%31%32%37.0.0.1/", "http://a..b/", "http://.x/"])
async def test_hosts_no_name_can_have_are_refused_before_any_lookup(url):
    with pytest.raises(FetchRefused, match="not a valid host name"):
        await check(url, FetchPolicy(resolver=no_lookup))


async def test_a_trailing_dot_changes_nothing():
    with pytest.raises(FetchRefused, match="loopback"):
        await check("http://127.0.0.1./", FetchPolicy(resolver=no_lookup))
    looked_up = []

    async def resolver(host: str, port: int) -> list[str]:
        looked_up.append(host)
        return ["93.184.216.34"]

    _, address = await check("https://images.example./cat.png", FetchPolicy(resolver=resolver))
    assert looked_up == ["images.example"] and address == "93.184.216.34"
    assert (await check("http://[2606:2800:220:1:248:1893:25c8:1946]/", FetchPolicy(resolver=no_lookup)))[
        1
    ] == "2606:2800:220:1:248:1893:25c8:1946"


def mock_client(handler) -> httpx.AsyncClient:
    """An httpx client whose every request is answered by `handler`: no packet leaves the process."""
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    "location, match",
    [
        ("http://0177.0.0.1/x.png", "cannot be parsed"),
        ("http://xn--/x.png", "cannot be parsed"),
        ("http://0x7f.1/x.png", "four decimal numbers"),
        ("http://[2002:a9fe:a9fe::]/latest/meta-data/", "link-local"),
        ("gopher://images.example/", "only http and https"),
    ],
)
async def test_a_redirect_to_an_unfetchable_url_is_refused(location, match):
    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        return httpx.Response(302, headers={"Location": location})

    async with mock_client(handler) as client:
        with pytest.raises(FetchRefused, match=match):
            async with guarded_stream(client, "http://images.example/cat.png", PUBLIC):
                pass
    assert asked == ["http://93.184.216.34/cat.png"]  # the redirect was never followed


@pytest.mark.parametrize(
    "error, match",
    [
        (httpx.UnsupportedProtocol, "cannot be requested"),
        (httpx.LocalProtocolError, "cannot be requested"),
        (httpx.InvalidURL, "cannot be parsed"),
    ],
)
async def test_requests_httpx_cannot_make_are_refused(error, match):
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("made up by the test")

    async with mock_client(handler) as client:
        with pytest.raises(FetchRefused, match=match):
            async with guarded_stream(client, "http://images.example/cat.png", PUBLIC):
                pass


def broken_gzip(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"\x1f\x8b not gzip at all" * 10)


def redirect_to_octal(request: httpx.Request) -> httpx.Response:
    return httpx.Response(302, headers={"Location": "http://0177.0.0.1/"})


async def test_probe_answers_unfetchable_and_undecodable_urls_with_a_problem():
    from smi.probe import probe_url

    async with mock_client(redirect_to_octal) as client:
        found = await probe_url(client, "http://0177.0.0.1/cat.png", PUBLIC)
        assert found.problem == "url_refused" and "cannot be parsed" in found.detail
        found = await probe_url(client, "http://images.example/cat.png", PUBLIC)
        assert found.problem == "url_refused" and "cannot be parsed" in found.detail
    async with mock_client(broken_gzip) as client:
        found = await probe_url(client, "http://images.example/cat.png", PUBLIC)
    assert found.problem == "image_unreachable" and "could not be decoded" in found.detail


@pytest.mark.parametrize("what, code", [("original image", "fetch_failed"), ("result", "invalid_result")])
async def test_downloads_turn_httpx_errors_into_the_workflows_error_kinds(tmp_path, what, code):
    from temporalio.exceptions import ApplicationError

    from activities.storage import StorageActivities

    refused = "image_url_refused" if what == "original image" else "result_url_refused"
    for handler, kind in ((broken_gzip, code), (redirect_to_octal, refused)):
        async with mock_client(handler) as client:
            storage = StorageActivities(Settings(env="dev", storage_dir=tmp_path / "storage"), http=client)
            with pytest.raises(ApplicationError) as caught:
                await storage._stream_to("http://images.example/cat.png", tmp_path / "part", 10**6, what, PUBLIC)
        assert caught.value.type == kind and caught.value.non_retryable, handler.__name__


@pytest.fixture
def bouncer():
    """A loopback server that serves an image some number of times, then redirects wherever it is told."""
    routes: dict[str, dict] = {}
    app = FastAPI()

    @app.get("/b/{name}")
    def bounce(name: str):
        route = routes[name]
        route["hits"] += 1
        if route["hits"] <= route["serve"]:
            return Response(route["image"], media_type="image/png")
        return Response(status_code=302, headers={"Location": route["location"]})

    with ServerThread(app) as server:

        def send(location: str, serve: int = 0, image: bytes = b"") -> str:
            name = f"r{len(routes)}"
            routes[name] = {"location": location, "serve": serve, "image": image, "hits": 0}
            return f"{server.url}/b/{name}"

        server.send = send
        yield server


async def test_urls_httpx_cannot_parse_are_refused_with_422(dev_env, stack_factory, canary, bouncer, shop):
    allowed = ",".join(server.url.split("//")[1] for server in (bouncer, shop))
    stack = stack_factory(dev_env, fetch_allow_hosts=allowed)
    client = stack.client()
    octal = f"http://0177.0.0.1:{canary.port}/stolen.png"  # 127.0.0.1 to the C library, an error to httpx
    for n, url in enumerate(
        [
            octal,
            f"http://0177.0.0.1:{shop.port}/img/x.png",  # the allow-listed shop, spelt another way
            f"http://127.0.0.01:{canary.port}/img.png",
            "http://xn--/img.png",
            f"http://0x7f.1:{canary.port}/img.png",  # hex and decimal: resolved without DNS, refused before that
            f"http://2130706433:{canary.port}/img.png",
            bouncer.send(octal),  # an allowed host redirecting to it
            bouncer.send(f"http://0x7f.1:{canary.port}/stolen.png"),
        ]
    ):
        reply = await asyncio.to_thread(client.post, "/v1/jobs", json=order(url, f"unparsable-{n}"))
        assert reply.status_code == 422, (url, reply.text)
        error = reply.json()["error"]
        assert error["code"] == "url_refused", url
        assert "cannot be parsed" in error["message"] or "four decimal numbers" in error["message"], error
        quote = await asyncio.to_thread(client.post, "/v1/quotes", json={"image_url": url, "scale_factor": 2})
        assert quote.status_code == 422 and quote.json()["error"]["code"] == "url_refused", (url, quote.text)
    assert canary.hits == []
    admin = await asyncio.to_thread(
        httpx.get, f"{stack.api.url}/v1/admin/jobs", headers={"Authorization": "Bearer test-admin-key"}
    )
    assert admin.json()["jobs"] == []
    assert not (stack.settings.storage_dir / "jobs").exists()


async def test_a_redirect_to_an_unparsable_url_while_fetching_is_refunded(
    dev_env, stack_factory, canary, bouncer, shop
):
    from tests.helpers import wait_for_status
    from worker import create_worker

    allowed = ",".join(server.url.split("//")[1] for server in (bouncer, shop))
    stack = stack_factory(dev_env, fetch_allow_hosts=allowed)
    client = stack.client()
    # The storefront's probe gets the image; the worker's download, a redirect httpx cannot parse.
    url = bouncer.send(f"http://0177.0.0.1:{canary.port}/stolen.png", serve=1, image=png_bytes(40, 30))
    async with create_worker(dev_env.client, stack.settings):
        reply = await asyncio.to_thread(client.post, "/v1/jobs", json=order(url, "bounced-later"))
        assert reply.status_code == 202, reply.text
        job_id = reply.json()["job_id"]
        job = await wait_for_status(client, job_id, {"completed", "failed", "manual_review"}, timeout=150)
        if job["status"] == "failed":
            await dev_env.client.get_workflow_handle(f"upscale-{job_id}").result()
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "image_url_refused" and "cannot be parsed" in job["error"]["message"]
    assert job["refund"] == {"status": "owed", "amount_cents": 1299, "reason": "image_url_refused"}
    assert canary.hits == []
