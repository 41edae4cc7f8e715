"""The "Buy hi-res" button (GET /embed.js) on a plain web page in real headless Chromium.

The page is served by this test on its own loopback origin (another port than the API's, so every call the
script makes is cross-origin, as on a real site), with images the default selector must and must not pick,
and loud CSS of its own for buttons, dialogs, labels and inputs. The API is the real one on a loopback port.
"""

from __future__ import annotations

import gzip
import html
import re
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys

from smi.serve import ServerThread
from tests import test_browser
from tests.conftest import ADMIN_KEY, png_bytes
from tests.stripe_server import StripeServer

browser = test_browser.browser  # the module's headless Chromium (installed by .ci/install-chromium when missing)
wait_until = test_browser.wait_until

README = Path(__file__).resolve().parent.parent / "README.md"
PK = "pk_test_embedpage1"
NONCE = "host-page-nonce"  # the host's own inline style and script, allowed by its CSP when it sends one
STRIPE_KEY = "sk_test_embed_local_1"
CUSTOMER = "ana@example.com"
# id -> (width, height, where): which images the default selector (main img, article img, >= 300 px) takes.
IMAGES = {
    "big-main": (640, 400, "main"),
    "linked": (400, 300, "main-link"),  # in <a><picture>: its button goes after the link, not inside it
    "small-main": (200, 150, "main"),
    "broken": (640, 400, "main"),  # shown at that size, but its file does not load
    "off": (640, 400, "main-off"),
    "big-article": (480, 320, "article"),
    "big-aside": (640, 400, "aside"),
    "late": (500, 300, "late"),  # added to <main> by the page after the script ran
    "foreign": (420, 300, "main-cdn"),  # from another host, one the key may not sell from
}
WITH_BUTTON = {"big-main", "linked", "big-article", "late", "foreign"}
HOST_CSS = """
* { font-family: "Comic Sans MS", cursive !important; letter-spacing: 3px; text-transform: uppercase; }
body { color: rgb(10, 20, 30); background: rgb(250, 240, 200); margin: 24px; }
button, [role="button"] { background: rgb(255, 0, 0) !important; color: rgb(0, 255, 0) !important;
  font-size: 40px !important; border: 6px dashed rgb(0, 0, 255) !important; padding: 30px !important; }
dialog, [role="dialog"], [aria-modal] { border: 9px solid rgb(255, 0, 255) !important; display: none !important; }
label, input, h2, legend, fieldset, form, p { color: rgb(255, 0, 0) !important; font-size: 31px !important; }
div { outline: 4px solid rgb(0, 128, 0); }
img { display: block; margin: 12px 0; }
"""
# The host's own elements whose computed style and place must not change when the script runs.
HOST_ELEMENTS = ["body", "h1", "host-button", "intro", "big-main", "linked", "small-main", "big-article", "aside"]


def page_html(api: str, cdn: str, with_script: bool) -> str:
    def img(name: str) -> str:
        w, h, where = IMAGES[name]
        off = ' data-smi="off"' if name == "off" else ""
        src = f"{cdn}/img/{name}.png" if where == "main-cdn" else f"/img/{name}.png"
        return f'<img id="{name}" src="{src}" width="{w}" height="{h}" alt="Photo {name}"{off}>'

    script = (
        f'<script src="{html.escape(api)}/embed.js" data-key="{PK}" data-sample="1" defer></script>'
        if with_script
        else ""
    )
    late = IMAGES["late"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>A plain page</title>
<style nonce="{NONCE}">{HOST_CSS}</style>{script}</head>
<body id="body">
<header><h1 id="h1">Holiday photos</h1></header>
<main>
  <button id="host-button" type="button">The page's own button</button>
  <p id="intro">Pictures from the trip.</p>
  {img("big-main")}
  <a id="link" href="/elsewhere"><picture>{img("linked")}</picture></a>
  {img("small-main")}
  {img("broken")}
  {img("off")}
  {img("foreign")}
</main>
<article>{img("big-article")}</article>
<aside id="aside">{img("big-aside")}</aside>
<script nonce="{NONCE}">
  setTimeout(function () {{
    var i = document.createElement("img");
    i.id = "late"; i.src = "/img/late.png"; i.width = {late[0]}; i.height = {late[1]}; i.alt = "Photo late";
    document.querySelector("main").appendChild(i);
  }}, 300);
</script>
</body></html>"""


class Page:
    def __init__(self) -> None:
        self.api = ""
        self.images = {name: png_bytes(w, h) for name, (w, h, _) in IMAGES.items()}
        app = FastAPI()

        @app.get("/page")
        def page(script: int = 1, csp: int = 0) -> HTMLResponse:
            headers = {}
            if csp:  # strict: no inline style or script but the page's own (nonce), calls only to the API
                headers["Content-Security-Policy"] = (
                    f"default-src 'none'; script-src {self.api} 'nonce-{NONCE}'; style-src 'nonce-{NONCE}'; "
                    f"img-src 'self' {self.cdn.url}; connect-src {self.api}"
                )
            return HTMLResponse(page_html(self.api, self.cdn.url, bool(script)), headers=headers)

        @app.get("/img/{name}.png")
        def image(name: str) -> Response:
            if name == "broken":
                return Response(status_code=404)
            return Response(self.images[name], media_type="image/png")

        @app.get("/elsewhere")
        def elsewhere() -> HTMLResponse:
            return HTMLResponse("<p>the link's target</p>")

        self.server = ServerThread(app)
        self.cdn = ServerThread(app)  # the same images on another port: another host to the key

    @property
    def origin(self) -> str:
        return self.server.url


@pytest.fixture
def stripe_server():
    server = StripeServer(STRIPE_KEY).start()
    yield server
    server.stop()


@pytest.fixture
def page(site_factory, stripe_server):
    """The page's server on its origin, and the real API on another, with a publishable key bound to them,
    creating its Checkout Sessions at the loopback Stripe (tests/stripe_server.py)."""
    host_page = Page()
    with host_page.server, host_page.cdn:
        netloc = host_page.origin.split("//")[1]
        api = site_factory(
            publishable_keys=f"{PK}={host_page.origin};{netloc}",
            allow_hosts=(netloc,),
            stripe_mode="test",
            stripe_secret_key_test=STRIPE_KEY,
            stripe_api_base=stripe_server.url,
            stripe_webhook_secret="whsec_test_embed_page",  # not used here; a checkout needs its webhook set up
        )
        host_page.api = api.url
        host_page.site = api
        yield host_page


# ---- what the browser shows ----

SHADOW_BUTTONS = """
return Array.from(document.querySelectorAll('smi-buy')).map(function (h) {
  var b = h.shadowRoot.querySelector('button'), r = b.getBoundingClientRect(), s = getComputedStyle(b);
  return {x: r.left + r.width / 2, y: r.top + r.height / 2, label: b.getAttribute('aria-label'),
          tag: b.tagName, type: b.type, tabIndex: b.tabIndex, background: s.backgroundColor,
          fontSize: s.fontSize, fontFamily: s.fontFamily, border: s.borderTopStyle, text: b.textContent};
});"""

IMAGE_RECTS = """
return Array.from(document.images).map(function (i) {
  var r = i.getBoundingClientRect();
  return {id: i.id, left: r.left, top: r.top, right: r.right, bottom: r.bottom};
});"""

HOST_STYLES = """
return arguments[0].map(function (id) {
  var e = document.getElementById(id), s = getComputedStyle(e), r = e.getBoundingClientRect(), out = {};
  for (var k = 0; k < s.length; k++) out[s[k]] = s.getPropertyValue(s[k]);
  out.rect = [r.left, r.top, r.width, r.height];
  return [id, out];
});"""

FOCUS = """
var a = document.activeElement;
if (!a) return null;
if (a.shadowRoot) {
  var inner = a.shadowRoot.activeElement;
  return {host: a.tagName, tag: inner && inner.tagName,
          label: inner && (inner.getAttribute('aria-label') || inner.textContent),
          inDialog: !!(inner && inner.closest('[role=dialog]'))};
}
return {host: null, tag: a.tagName, id: a.id};"""

DIALOG = """
var h = document.querySelector('smi-dialog');
if (!h) return null;
var d = h.shadowRoot.querySelector('[role=dialog]'), s = getComputedStyle(d), title = h.shadowRoot.getElementById(
  d.getAttribute('aria-labelledby'));
return {role: d.getAttribute('role'), modal: d.getAttribute('aria-modal'), title: title && title.textContent,
        border: s.borderTopStyle + ' ' + s.borderTopColor, display: s.display,
        visible: d.getBoundingClientRect().width > 0,
        error: h.shadowRoot.querySelector('[role=alert]').textContent,
        options: Array.from(h.shadowRoot.querySelectorAll('label[data-scale]')).map(function (l) {
          return {scale: +l.dataset.scale, price: +l.dataset.price, currency: l.dataset.currency, text: l.textContent};
        })};"""


def buttons(driver) -> list[dict]:
    return driver.execute_script(SHADOW_BUTTONS)


def images_with_buttons(driver) -> set[str]:
    """The images a button sits on (its centre inside the image's box)."""
    rects = driver.execute_script(IMAGE_RECTS)
    return {
        r["id"]
        for b in buttons(driver)
        for r in rects
        if r["left"] <= b["x"] <= r["right"] and r["top"] <= b["y"] <= r["bottom"]
    }


def host_styles(driver) -> dict:
    return dict(driver.execute_script(HOST_STYLES, HOST_ELEMENTS))


def focus(driver) -> dict | None:
    return driver.execute_script(FOCUS)


def dialog(driver) -> dict | None:
    return driver.execute_script(DIALOG)


def press(driver, *keys) -> None:
    ActionChains(driver).send_keys(*keys).perform()


def open_page(driver, page: Page, query: str = "") -> None:
    driver.get(f"{page.origin}/page{query}")
    wait_until(driver, lambda d: len(buttons(d)) == len(WITH_BUTTON))
    time.sleep(0.5)  # a button the script should not have placed would come now


# ---- the tests ----


def test_embed_js_is_static_cacheable_javascript(page):
    api = page.api
    first = httpx.get(f"{api}/embed.js")
    assert first.status_code == 200
    assert first.headers["content-type"] == "text/javascript; charset=utf-8"
    assert first.headers["cache-control"] == "public, max-age=3600"
    assert first.headers["x-content-type-options"] == "nosniff"
    etag = first.headers["etag"]
    assert etag.startswith('"') and first.text.startswith("/*")
    again = httpx.get(f"{api}/embed.js", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    changed = httpx.get(f"{api}/embed.js", headers={"If-None-Match": '"something-else"'})
    assert changed.status_code == 200 and changed.content == first.content
    # Small, and the README says how small: raw and gzipped, as served.
    stated = re.search(r"no build step: ([0-9,]+) bytes, ([0-9,]+) gzipped", README.read_text())
    assert stated, "the README's embed.js section states its size"
    sizes = (len(first.content), len(gzip.compress(first.content, 9, mtime=0)))
    assert tuple(int(n.replace(",", "")) for n in stated.groups()) == sizes, f"update the README: {sizes}"
    assert sizes[0] < 16 * 1024


def test_buttons_on_the_right_images_and_the_host_page_untouched(page, browser):
    browser.get(f"{page.origin}/page?script=0")
    wait_until(browser, lambda d: d.execute_script("return !!document.getElementById('late')"))
    before = host_styles(browser)

    open_page(browser, page)
    assert images_with_buttons(browser) == WITH_BUTTON
    placed = buttons(browser)
    for b in placed:  # real buttons, named for screen readers, focusable, and not dressed by the host's CSS
        assert (b["tag"], b["type"], b["tabIndex"]) == ("BUTTON", "button", 0)
        assert b["label"].startswith("Buy hi-res: buy a high-resolution copy of \u201cPhoto ")
        assert b["text"] == "Buy hi-res"
        assert b["background"] != "rgb(255, 0, 0)" and b["fontSize"] != "40px" and b["border"] != "dashed"
        assert "Comic Sans" not in b["fontFamily"]
    after = host_styles(browser)
    assert after.keys() == before.keys()
    for element in HOST_ELEMENTS:  # every computed property and every box of the host's own elements as before
        changed = {k: (v, after[element].get(k)) for k, v in before[element].items() if after[element].get(k) != v}
        assert changed == {}, f"the script changed #{element}: {changed}"

    # Its button inside the link opens the modal and does not follow the link.
    browser.execute_script(
        "document.querySelector('#link').nextElementSibling.shadowRoot.querySelector('button').click()"
    )
    wait_until(browser, lambda d: dialog(d) is not None)
    assert browser.current_url == f"{page.origin}/page"
    shown = dialog(browser)
    assert shown["role"] == "dialog" and shown["modal"] == "true" and shown["title"] == "Buy a high-resolution copy"
    assert shown["visible"] and shown["display"] != "none" and "rgb(255, 0, 255)" not in shown["border"]
    assert host_styles(browser) == after  # the open modal changes no host element either


def test_keyboard_only_tab_enter_escape(page, browser):
    open_page(browser, page)
    browser.execute_script("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)")
    reached = []
    for _ in range(6):
        press(browser, Keys.TAB)
        reached.append(focus(browser))
        if reached[-1]["host"] == "SMI-BUY":
            break
    # The page's own button first, then the button of the first image: tab order follows the page.
    assert reached[0] == {"host": None, "tag": "BUTTON", "id": "host-button"}
    assert reached[-1]["host"] == "SMI-BUY" and reached[-1]["tag"] == "BUTTON"
    assert "Photo big-main" in reached[-1]["label"]
    opener = reached[-1]

    press(browser, Keys.ENTER)
    wait_until(browser, lambda d: dialog(d) is not None)
    wait_until(browser, lambda d: (focus(d) or {}).get("inDialog"))
    for _ in range(8):  # focus stays in the dialog, forwards and backwards
        press(browser, Keys.TAB)
        assert focus(browser)["inDialog"], focus(browser)
    for _ in range(3):
        ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
        assert focus(browser)["inDialog"], focus(browser)

    press(browser, Keys.ESCAPE)
    wait_until(browser, lambda d: dialog(d) is None)
    assert focus(browser) == opener  # focus back on the button that opened it

    press(browser, Keys.ENTER)  # and it opens again from there
    wait_until(browser, lambda d: dialog(d) is not None)
    press(browser, Keys.ESCAPE)
    wait_until(browser, lambda d: dialog(d) is None)


def quote_of(page: Page, image: str) -> dict:
    reply = httpx.post(
        f"{page.api}/v1/checkout/quote",
        json={"image_url": f"{page.origin}/img/{image}.png"},
        headers={"Authorization": f"Bearer {PK}", "Origin": page.origin},
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def open_modal_of(driver, image: str) -> None:
    driver.execute_script(
        "var i = document.getElementById(arguments[0]);"
        "(i.closest('a') || i).nextElementSibling.shadowRoot.querySelector('button').click()",
        image,
    )
    wait_until(driver, lambda d: dialog(d) is not None)


def test_the_modal_shows_the_quoted_prices_and_refusals_in_words(page, browser):
    open_page(browser, page)
    quoted = quote_of(page, "big-main")
    assert quoted["options"], quoted
    open_modal_of(browser, "big-main")
    wait_until(browser, lambda d: dialog(d)["options"])
    shown = dialog(browser)
    assert shown["error"] == ""
    expected = [(o["scale_factor"], o["price"], o["currency"]) for o in quoted["options"]]
    assert [(o["scale"], o["price"], o["currency"]) for o in shown["options"]] == expected
    for option, o in zip(shown["options"], quoted["options"], strict=True):  # what the customer reads
        assert f"{o['scale_factor']}\u00d7" in option["text"]
        assert f"{o['output_width']} \u00d7 {o['output_height']} px" in option["text"]
        assert f"{o['price']:.2f}" in option["text"].replace(",", "")
    # The first size is chosen; Pay with no email says what to fix and calls no one.
    shadow = "return document.querySelector('smi-dialog').shadowRoot"
    assert browser.execute_script(shadow + ".querySelector('input[name=scale]:checked').value") == str(
        quoted["options"][0]["scale_factor"]
    )
    browser.execute_script(shadow + ".querySelector('button.pay').click()")
    wait_until(browser, lambda d: dialog(d)["error"])
    assert dialog(browser)["error"].startswith("Enter the email address the download link should go to")
    assert browser.current_url == f"{page.origin}/page"
    press(browser, Keys.ESCAPE)
    wait_until(browser, lambda d: dialog(d) is None)

    # An image from a host the key may not sell from: the server's refusal, in words, in the modal.
    open_modal_of(browser, "foreign")
    wait_until(browser, lambda d: dialog(d)["error"])
    shown = dialog(browser)
    assert shown["options"] == []
    assert shown["error"].startswith("this publishable key may not sell images from this host")
    disabled = browser.execute_script(shadow + ".querySelector('button.pay').disabled")
    assert disabled is True


def funnel_rows(page: Page) -> dict:
    reply = httpx.get(f"{page.api}/v1/admin/analytics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert reply.status_code == 200, reply.text
    report = reply.json()
    return {"pages": {r["url"]: r for r in report["pages"]}, "images": {r["url"]: r for r in report["images"]}}


def test_the_funnel_counts_buttons_shown_and_modals_opened(page, browser):
    open_page(browser, page)  # data-sample="1": every view counted, each standing for one
    for _ in range(2):
        open_modal_of(browser, "big-main")
        press(browser, Keys.ESCAPE)
        wait_until(browser, lambda d: dialog(d) is None)
    image = {name: f"{page.origin}/img/{name}.png" for name in IMAGES}
    counted = WITH_BUTTON - {"foreign"}  # the foreign host's batch is refused alone; the others count
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the script sends its batches 1.5 s after the last event
        rows = funnel_rows(page)
        if {u: r["shown"] for u, r in rows["images"].items()} == {image[n]: 1 for n in counted} and rows["images"][
            image["big-main"]
        ]["opened"] == 2:
            break
        time.sleep(0.5)
    assert {u: (r["shown"], r["opened"]) for u, r in rows["images"].items()} == {
        image[n]: (1, 2 if n == "big-main" else 0) for n in counted
    }
    assert {u: (r["shown"], r["opened"]) for u, r in rows["pages"].items()} == {f"{page.origin}/page": (4, 2)}


def test_pay_lands_on_the_stripe_checkout_of_the_quoted_price(page, browser, stripe_server):
    open_page(browser, page)
    quoted = quote_of(page, "big-article")
    chosen = quoted["options"][-1]  # not the preselected first: the customer's choice is what is bought
    open_modal_of(browser, "big-article")
    wait_until(browser, lambda d: dialog(d)["options"])
    shadow = "return document.querySelector('smi-dialog').shadowRoot"
    browser.execute_script(shadow + f".querySelector('input[name=scale][value=\"{chosen['scale_factor']}\"]').click()")
    email = browser.execute_script(shadow + ".querySelector('input[type=email]')")
    email.send_keys(CUSTOMER)  # typed, as a customer would

    # Stripe refuses (a wrong secret key): the modal says so in words, and Pay can be pressed again.
    stripe_server.secret_key = "sk_test_not_this_one"
    browser.execute_script(shadow + ".querySelector('button.pay').click()")
    wait_until(browser, lambda d: dialog(d)["error"])
    assert dialog(browser)["error"] == "the payment provider did not answer; try again"
    assert browser.current_url == f"{page.origin}/page" and stripe_server.sessions == {}
    assert browser.execute_script(shadow + ".querySelector('button.pay').disabled") is False

    stripe_server.secret_key = STRIPE_KEY
    browser.execute_script(shadow + ".querySelector('button.pay').click()")
    wait_until(browser, lambda d: stripe_server.sessions and d.current_url != f"{page.origin}/page")
    [session] = stripe_server.sessions.values()
    assert browser.current_url == session["url"]  # the browser went to the Checkout Session's URL
    assert session["customer_email"] == CUSTOMER and session["cancel_url"] == f"{page.origin}/page"
    assert session["metadata"]["scale_factor"] == str(chosen["scale_factor"])
    [item] = session["line_items_seen"]
    assert int(item["price_data"]["unit_amount"]) == round(chosen["price"] * 100)  # the price the modal showed


def test_a_page_with_a_strict_content_security_policy(page, browser):
    """No inline style allowed: the script styles itself through the CSSOM (adopted sheets, element.style)."""
    browser.get_log("browser")  # what earlier pages logged
    open_page(browser, page, "?csp=1")
    assert images_with_buttons(browser) == WITH_BUTTON
    assert {b["background"] for b in buttons(browser)} == {"rgb(26, 86, 219)"}  # its own blue, not the host's red
    open_modal_of(browser, "big-main")
    wait_until(browser, lambda d: dialog(d)["options"])
    assert dialog(browser)["visible"]
    assert test_browser.csp_violations(browser) == []
