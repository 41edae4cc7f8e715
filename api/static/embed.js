/* "Buy hi-res": <script src="https://API/embed.js" data-key="pk_..." defer></script>
   Options: data-selector (CSS, default "main img, article img"), data-min-width (px, default 300),
   data-label (the button's text), data-sample (the share of page views whose buttons shown are counted,
   default 0.1; 0: none). <img data-smi="off"> opts an image out. Vanilla JS, no framework;
   everything it draws lives in shadow roots, so no style crosses between it and the page. */
(function () {
  "use strict";
  var me = document.currentScript || document.querySelector("script[src*='embed.js'][data-key]");
  if (!me || window.__smiEmbed || !document.head.attachShadow) return; // once, and only where shadow DOM is
  window.__smiEmbed = true;
  var key = me.getAttribute("data-key") || "";
  var api = new URL(me.src, location.href).origin;
  var selector = me.getAttribute("data-selector") || "main img, article img";
  var minWidth = parseInt(me.getAttribute("data-min-width"), 10);
  if (isNaN(minWidth)) minWidth = 300;
  var label = me.getAttribute("data-label") || "Buy hi-res";
  var sample = Math.min(1, Math.max(0, parseFloat(me.getAttribute("data-sample") || "0.1") || 0));
  var shownCounted = sample > 0 && Math.random() < sample; // one draw per page view: its buttons all or none
  var shownWeight = sample > 0 ? Math.min(100, Math.max(1, Math.round(1 / sample))) : 0;
  if (!/^pk_/.test(key)) return console.warn("embed.js: data-key must be a publishable key (pk_...)");
  try {
    document.querySelector(selector);
  } catch (e) {
    return console.warn("embed.js: data-selector is not a CSS selector: " + selector);
  }
  var HOST = "all:initial!important;position:absolute!important;width:0!important;height:0!important;" +
    "margin:0!important;padding:0!important;border:0!important;overflow:visible!important;z-index:2147483646!important";
  var BASE = ":host{all:initial}*{box-sizing:border-box;font:15px/1.4 system-ui,sans-serif;color:#111;" +
    "letter-spacing:normal;text-transform:none}button{cursor:pointer;border:0;border-radius:6px;padding:8px 14px;" +
    "background:#1a56db;color:#fff;font-weight:600}button:focus-visible,input:focus-visible{outline:3px solid #f59e0b;" +
    "outline-offset:2px}";
  var placed = [];
  var seen = new WeakSet();

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = text;
    return e;
  }

  function post(path, body, keepalive) {
    return fetch(api + path, {
      method: "POST",
      mode: "cors",
      credentials: "omit",
      keepalive: !!keepalive,
      headers: { "Content-Type": "application/json", Authorization: "Bearer " + key },
      body: JSON.stringify(body),
    });
  }

  /* ---- the funnel: buttons shown (sampled) and modals opened, batched per image host (a host the key
     may not sell from is refused alone), no cookie, the page without its query or fragment ---- */
  var queue = {}, timer = 0;
  function count(stage, imageUrl) {
    if (stage == "shown" && !shownCounted) return;
    var host = new URL(imageUrl).host;
    (queue[host] = queue[host] || []).push({
      stage: stage, page_url: location.origin + location.pathname, image_url: imageUrl,
      count: stage == "shown" ? shownWeight : 1,
    });
    clearTimeout(timer);
    timer = setTimeout(flush, 1500);
  }
  function flush(leaving) {
    clearTimeout(timer);
    for (var host in queue) {
      for (var all = queue[host]; all.length; ) post("/v1/funnel", { events: all.splice(0, 50) }, leaving === true).catch(function () {});
    }
    queue = {};
  }
  addEventListener("pagehide", function () { flush(true); });
  document.addEventListener("visibilitychange", function () { if (document.visibilityState == "hidden") flush(true); });

  // Styles by CSSOM (adopted sheets, element.style): a page whose Content-Security-Policy forbids inline
  // styles still shows them; a <style> element only where adopted sheets are missing.
  function styled(root, css) {
    if ("adoptedStyleSheets" in root && window.CSSStyleSheet) {
      var sheet = new CSSStyleSheet();
      sheet.replaceSync(css);
      root.adoptedStyleSheets = [sheet];
    } else root.appendChild(el("style", {}, css));
  }

  function call(path, body) {
    return post(path, body).then(
      function (r) {
        return r.json().then(
          function (j) { return { status: r.status, body: j }; },
          function () { return { status: r.status, body: null }; }
        );
      },
      function () {
        throw new Error("We could not reach the payment service. Check your connection and try again.");
      }
    ).then(function (r) {
      if (r.status >= 200 && r.status < 300) return r.body;
      var said = r.body && r.body.error && r.body.error.message;
      if (r.status == 429) said = "Too many attempts right now. Please wait a minute and try again.";
      throw new Error(said || "Something went wrong on our side (error " + r.status + "). Please try again later.");
    });
  }

  function here() { // the page Stripe returns a cancelled payment to, without its #fragment
    var u = location.href.split("#")[0];
    return u.length > 2048 ? location.origin + location.pathname : u;
  }

  function money(amount, currency) {
    try {
      return new Intl.NumberFormat(undefined, { style: "currency", currency: currency }).format(amount);
    } catch (e) {
      return amount + " " + currency;
    }
  }

  /* ---- the buttons ---- */
  function eligible(img) {
    if (seen.has(img) || img.getAttribute("data-smi") == "off" || !img.matches(selector)) return false;
    var src = img.currentSrc || img.src;
    return /^https?:/.test(src) && img.naturalWidth > 0 && img.getBoundingClientRect().width >= minWidth;
  }

  function consider(img) {
    if (!img.complete) return img.addEventListener("load", function () { consider(img); }, { once: true });
    if (!eligible(img)) return;
    seen.add(img);
    var after = img.closest("a, button, label") || img.closest("picture") || img; // never a button inside a link
    var host = el("smi-buy");
    host.style.cssText = HOST;
    var root = host.attachShadow({ mode: "open" });
    var box = el("div");
    styled(root, BASE + "div{position:absolute;pointer-events:none}" +
      "button{position:absolute;top:8px;right:8px;pointer-events:auto;box-shadow:0 1px 4px rgba(0,0,0,.4)}");
    var button = el("button", { type: "button", "aria-label": label + ": buy a high-resolution copy of " +
      (img.alt ? "\u201c" + img.alt + "\u201d" : "this image") }, label);
    button.addEventListener("click", function (e) {
      e.preventDefault();
      e.stopPropagation();
      open(img, button);
    });
    box.appendChild(button);
    root.appendChild(box);
    after.insertAdjacentElement("afterend", host);
    placed.push({ img: img, host: host, box: box });
    place();
    count("shown", img.currentSrc || img.src);
    if (window.ResizeObserver) new ResizeObserver(place).observe(img);
  }

  function place() {
    placed.forEach(function (p) {
      var a = p.img.getBoundingClientRect(), h = p.host.getBoundingClientRect();
      var s = p.box.style;
      s.left = a.left - h.left + "px";
      s.top = a.top - h.top + "px";
      s.width = a.width + "px";
      s.height = a.height + "px";
      s.display = a.width && p.img.isConnected ? "block" : "none";
    });
  }

  function scan(node) {
    if (node.tagName == "IMG") consider(node);
    else if (node.querySelectorAll) Array.prototype.forEach.call(node.querySelectorAll("img"), consider);
  }

  /* ---- the modal ---- */
  var modal = null, quotes = {};

  function quoteOf(imageUrl) { // once per image and page view (the quote is rate-limited), again after a failure
    var q = quotes[imageUrl] = quotes[imageUrl] || call("/v1/checkout/quote", { image_url: imageUrl });
    q.catch(function () { delete quotes[imageUrl]; });
    return q;
  }

  function open(img, opener) {
    if (modal) modal.close();
    var imageUrl = img.currentSrc || img.src;
    var host = el("smi-dialog");
    host.style.cssText = HOST.replace("absolute", "fixed");
    var root = host.attachShadow({ mode: "open" });
    styled(root, BASE +
      ".back{position:fixed;inset:0;background:rgba(0,0,0,.55);display:flex;align-items:center;justify-content:center}" +
      "[role=dialog]{background:#fff;border-radius:10px;padding:20px 22px;width:min(420px,92vw);max-height:92vh;" +
      "overflow:auto;position:relative;box-shadow:0 10px 40px rgba(0,0,0,.4)}h2{font-size:19px;font-weight:700;" +
      "margin:0 0 12px}fieldset{border:0;margin:0 0 12px;padding:0}label{display:block;margin:6px 0}" +
      "input[type=email]{display:block;width:100%;margin-top:4px;padding:8px;border:1px solid #888;border-radius:6px}" +
      ".x{position:absolute;top:10px;right:10px;background:#eee;color:#111;padding:4px 10px}" +
      ".err{color:#b00020;margin:10px 0 0;min-height:1em}.pay{margin-top:14px;width:100%}" +
      ".muted{color:#555;font-size:13px}");
    var back = el("div", { class: "back" });
    var dialog = el("div", { role: "dialog", "aria-modal": "true", "aria-labelledby": "smi-t" });
    var close = el("button", { type: "button", class: "x", "aria-label": "Close" }, "\u00d7");
    var form = el("form", { novalidate: "" });
    var list = el("fieldset", {});
    var email = el("input", { type: "email", name: "email", required: "", autocomplete: "email", id: "smi-e" });
    var pay = el("button", { type: "submit", class: "pay", disabled: "" }, "Pay");
    var err = el("p", { class: "err", role: "alert", "aria-live": "assertive" });
    var note = el("p", { class: "muted" }, "Getting sizes and prices\u2026");
    var emailLabel = el("label", { for: "smi-e" }, "Email for the download link");
    list.appendChild(el("legend", {}, "Size"));
    list.appendChild(note);
    emailLabel.appendChild(email);
    [list, emailLabel, pay, err].forEach(function (n) { form.appendChild(n); });
    [el("h2", { id: "smi-t" }, "Buy a high-resolution copy"), close, form].forEach(function (n) { dialog.appendChild(n); });
    back.appendChild(dialog);
    root.appendChild(back);
    document.body.appendChild(host);
    modal = {
      close: function () {
        host.remove();
        modal = null;
        document.removeEventListener("keydown", keys, true);
        opener.focus();
      },
    };

    function focusables() {
      return Array.prototype.filter.call(dialog.querySelectorAll("button, input"), function (n) { return !n.disabled; });
    }
    function keys(e) {
      if (e.key == "Escape") {
        e.preventDefault();
        e.stopPropagation();
        return modal && modal.close();
      }
      if (e.key != "Tab") return;
      var all = focusables(), first = all[0], last = all[all.length - 1], at = root.activeElement;
      if (e.shiftKey ? at == first || !at : at == last || !at) {
        e.preventDefault();
        (e.shiftKey ? last : first).focus();
      }
    }
    document.addEventListener("keydown", keys, true);
    close.addEventListener("click", function () { modal && modal.close(); });
    back.addEventListener("click", function (e) { if (e.target == back && modal) modal.close(); });
    close.focus();
    count("opened", imageUrl);

    quoteOf(imageUrl).then(function (quote) {
      note.remove();
      var options = (quote && quote.options) || [];
      if (!options.length) throw new Error("This image cannot be sold in a higher resolution.");
      options.forEach(function (o, i) {
        var row = el("label", { "data-scale": o.scale_factor, "data-price": o.price, "data-currency": o.currency });
        var radio = el("input", { type: "radio", name: "scale", value: o.scale_factor });
        if (!i) radio.checked = true;
        row.appendChild(radio);
        row.appendChild(document.createTextNode(" " + o.scale_factor + "\u00d7 \u2014 " + o.output_width +
          " \u00d7 " + o.output_height + " px \u2014 " + money(o.price, o.currency)));
        list.appendChild(row);
      });
      pay.disabled = false;
      (root.activeElement == close ? list.querySelector("input") : root.activeElement || close).focus();
    }).catch(function (e) {
      note.remove();
      err.textContent = e.message;
    });

    form.addEventListener("submit", function (e) {
      e.preventDefault();
      err.textContent = "";
      var chosen = form.querySelector("input[name=scale]:checked");
      if (!chosen) return;
      if (!email.value || !email.checkValidity()) {
        err.textContent = "Enter the email address the download link should go to (like name@example.com).";
        return email.focus();
      }
      pay.disabled = true;
      pay.textContent = "Going to payment\u2026";
      call("/v1/checkout", {
        image_url: imageUrl, scale_factor: +chosen.value, email: email.value, page_url: here(),
      }).then(function (r) {
        flush(true);
        location.assign(r.checkout_url);
      }).catch(function (x) {
        err.textContent = x.message;
        pay.disabled = false;
        pay.textContent = "Pay";
      });
    });
  }

  /* ---- start ---- */
  function start() {
    scan(document.body);
    new MutationObserver(function (changes) {
      changes.forEach(function (c) {
        Array.prototype.forEach.call(c.addedNodes, function (n) { if (n.nodeType == 1 && !/^SMI-/.test(n.tagName)) scan(n); });
      });
    }).observe(document.body, { childList: true, subtree: true });
    addEventListener("resize", place);
    addEventListener("load", place);
    if (window.ResizeObserver) new ResizeObserver(place).observe(document.body);
  }
  if (document.readyState == "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
