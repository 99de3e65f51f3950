// The real-browser end-to-end test of LibreChat's web UI under the BFF's mount path: headless
// Debian Chromium driven by playwright-core, the page of page/app.js (LibreChat's real client
// request layer, librechat-data-provider) served by the fake LibreChat through the BFF.
//
//   node tests/browser/run.mjs CONFIG.json
//
// Started by tests/api/ui_browser.rs, which runs the servers, signs users in and writes CONFIG:
//   bff            BFF origin, e.g. http://127.0.0.1:41234
//   mount          the UI mount path, e.g. /chat
//   cookie         {name, secure}: the BFF session cookie
//   sessions       {signedIn, revoked, logout}: session ids (cookie values), one per scenario
//   user           {name}: the name the signed-in page must show (user of signedIn and logout)
//   revoke         {url, token}: DELETE this URL with this Bearer to end the `revoked` session
//   loginUrl       the product's login page (ui.login_url, absolute)
//   afterLogoutUrl the product's page after logout (ui.after_logout_url, absolute)
//   returnParam    the query parameter carrying where to come back (ui.return_param)
//   chromium       path of the browser binary
//   artifacts      directory for screenshots and, on failure, network logs
//
// Prints one line per scenario on stderr and, last on stdout, one JSON line
// {"passed":[names],"failed":[{name,error}]}; exits 1 when a scenario failed.

import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

const cfg = JSON.parse(await readFile(process.argv[2], 'utf8'));
const mount = cfg.mount.replace(/\/$/, '');
const ui = `${cfg.bff}${mount}`;
const apiPrefix = `${ui}/api/`;
const PLACEHOLDER = /^bff-ui\.[0-9a-f]+$/;
// A JWT anywhere (LibreChat's access and refresh tokens are JWTs; the placeholder is not one).
const JWT = /eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}/;
const LIBRECHAT_COOKIES = ['refreshToken', 'token_provider', 'openid_access_token', 'openid_id_token'];
const TIMEOUT = 15_000;

await mkdir(cfg.artifacts, { recursive: true });
for (const old of await readdir(cfg.artifacts)) {
  if (/\.(png|json)$/.test(old)) await rm(join(cfg.artifacts, old));
}

// ---------------------------------------------------------------------------------------------
// What the browser sent and received, per context.

class Traffic {
  /** Records a context's exchanges (Playwright: the headers really sent, statuses) and its
   *  page's response bodies (below). */
  static async open(context, page) {
    const traffic = new Traffic(context);
    await traffic.holdBodies(page);
    return traffic;
  }

  constructor(context) {
    this.exchanges = [];
    this.pending = new Set();
    this.bodies = [];
    context.on('request', (request) => {
      this.exchanges.push({ request, url: request.url(), method: request.method() });
    });
    context.on('response', (response) => {
      const p = this.capture(response).finally(() => this.pending.delete(p));
      this.pending.add(p);
    });
  }

  /** Response bodies as Chromium receives them. Each answer under the mount path is held at
   *  its headers (CDP Fetch, response stage) until its body has been read, then released
   *  unchanged: a body read afterwards through Playwright is gone once a navigation commits, and
   *  the client navigates right after reading the refresh, logout and config answers. Event
   *  streams are not held (read through Playwright); scripts are not read. */
  async holdBodies(page) {
    const cdp = await page.context().newCDPSession(page);
    cdp.on('Fetch.requestPaused', async ({ requestId, request, responseStatusCode, responseHeaders }) => {
      const type = (responseHeaders ?? []).find((h) => h.name.toLowerCase() === 'content-type')?.value ?? '';
      const body = { url: request.url, claimed: false, text: null };
      this.bodies.push(body);
      const redirect = responseStatusCode >= 300 && responseStatusCode < 400;
      try {
        if (!redirect && /json|text\/(html|plain)/.test(type)) {
          const r = await cdp.send('Fetch.getResponseBody', { requestId });
          body.text = r.base64Encoded ? Buffer.from(r.body, 'base64').toString('utf8') : r.body;
        } else if (/event-stream/.test(type)) {
          body.fromPlaywright = true;
        }
      } catch (e) {
        body.error = e.message;
      } finally {
        await cdp.send('Fetch.continueRequest', { requestId }).catch(() => {});
      }
    });
    await cdp.send('Fetch.enable', { patterns: [{ urlPattern: `${ui}/*`, requestStage: 'Response' }] });
  }

  async capture(response) {
    const entry = this.exchanges.find((e) => e.request === response.request());
    if (!entry) return;
    entry.requestHeaders = await response.request().allHeaders().catch(() => ({}));
    entry.responseHeaders = await response.headersArray().catch(() => []);
    const type = entry.responseHeaders.find((h) => h.name.toLowerCase() === 'content-type')?.value;
    if (/event-stream/.test(type ?? '')) entry.body = await response.text().catch(() => null);
    entry.status = response.status();
  }

  /** Waits until every exchange seen so far has its answer, and pairs each answer under the
   *  mount path with the body held for it (same URL, in order). */
  async settle() {
    while (this.pending.size) await Promise.all([...this.pending]);
    for (const e of this.exchanges) {
      if (e.paired || e.status === undefined || !e.url.startsWith(`${ui}/`)) continue;
      const body = this.bodies.find((b) => !b.claimed && b.url === e.url);
      if (!body) continue;
      body.claimed = e.paired = true;
      if (e.body === undefined) e.body = body.text;
      if (body.error) e.bodyError = body.error;
    }
  }

  mark() {
    return this.exchanges.length;
  }

  since(mark) {
    return this.exchanges.slice(mark);
  }

  api(path, from = 0) {
    return this.exchanges
      .slice(from)
      .filter((e) => e.url.split('?')[0] === `${ui}/api/${path}`);
  }

  dump() {
    return this.exchanges.map((e) => ({
      method: e.method,
      url: e.url,
      status: e.status ?? null,
      requestHeaders: e.requestHeaders ?? null,
      responseHeaders: e.responseHeaders ?? null,
      body: e.body == null ? null : e.body.slice(0, 2000),
      bodyError: e.bodyError ?? null,
    }));
  }

  /** The browser never holds a LibreChat token: no JWT in any body, header or cookie, and
   *  every Authorization it sent is a placeholder. */
  assertNoLibreChatToken() {
    for (const e of this.exchanges) {
      const where = `${e.method} ${e.url}`;
      if (e.body != null) assert.doesNotMatch(e.body, JWT, `a JWT in the body of ${where}`);
      for (const { name, value } of e.responseHeaders ?? []) {
        assert.doesNotMatch(value, JWT, `a JWT in response header ${name} of ${where}`);
        if (name.toLowerCase() === 'set-cookie') {
          const cookie = value.split('=')[0].trim();
          assert.ok(!LIBRECHAT_COOKIES.includes(cookie), `LibreChat cookie ${cookie} set by ${where}`);
        }
      }
      const auth = e.requestHeaders?.authorization;
      if (auth != null) {
        assert.doesNotMatch(auth, JWT, `a JWT sent as Authorization to ${where}`);
        assert.match(auth, /^Bearer bff-ui\.[0-9a-f]+$/, `Authorization sent to ${where}`);
      }
    }
  }

  /** Everything the page itself asked for stayed under the mount path (the rewritten
   *  `<base href>` is what points the relative bundle and the client's API base there). */
  assertUnderMount(allowedOrigins = []) {
    for (const e of this.exchanges) {
      const ok =
        e.url === ui || e.url.startsWith(`${ui}/`) || allowedOrigins.some((o) => e.url.startsWith(o));
      assert.ok(ok, `request outside ${mount}/: ${e.method} ${e.url}`);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Helpers

async function newContext(browser, sessionId) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  context.setDefaultTimeout(TIMEOUT);
  if (sessionId) {
    await context.addCookies([
      {
        name: cfg.cookie.name,
        value: sessionId,
        // Host-only (as `__Host-` requires), for the BFF's host; Chromium keeps Secure cookies
        // for plain-http loopback origins.
        domain: new URL(cfg.bff).hostname,
        path: '/',
        httpOnly: true,
        secure: cfg.cookie.secure,
        sameSite: 'Lax',
      },
    ]);
  }
  const page = await context.newPage();
  const traffic = await Traffic.open(context, page);
  const log = [];
  page.on('console', (m) => log.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (err) => log.push(`pageerror: ${err.message}`));
  return track({ context, page, traffic, console: log });
}

// The contexts a scenario used, for the screenshots and network logs of a failure.
let inScenario = [];
function track(s) {
  inScenario.push(s);
  return s;
}

async function signedInPage(browser, sessionId, path) {
  const s = await newContext(browser, sessionId);
  const [refresh, doc] = await Promise.all([
    s.page.waitForResponse(
      (r) => r.url() === `${ui}/api/auth/refresh` && r.request().method() === 'POST',
    ),
    s.page.goto(`${ui}${path}`),
  ]);
  assert.equal(doc.status(), 200, `GET ${mount}${path} with a session`);
  const html = await doc.text();
  assert.match(html, new RegExp(`<base href="${mount}/"`), `index.html's <base href> rewritten`);
  assert.doesNotMatch(html, /<base href="\/"/, 'no <base href="/"> left');
  assert.equal(refresh.status(), 200, 'refresh status');
  const body = await refresh.json();
  assert.match(body.token ?? '', PLACEHOLDER, `refresh token: ${JSON.stringify(body.token)}`);
  await s.page.locator('body[data-auth="signed-in"]').waitFor();
  return Object.assign(s, { token: body.token, refreshUser: body.user });
}

function productUrl(url) {
  const u = new URL(url);
  return `${u.origin}${u.pathname}`;
}

async function landedOnLogin(page, expectedNext) {
  await page.waitForURL((u) => productUrl(u.href) === productUrl(cfg.loginUrl));
  await page.locator('#product-login').waitFor();
  const next = new URL(page.url()).searchParams.get(cfg.returnParam);
  assert.equal(next, expectedNext, `${cfg.returnParam} on the product login URL ${page.url()}`);
}

function countRefreshes(traffic, from) {
  return traffic.api('auth/refresh', from).length;
}

// ---------------------------------------------------------------------------------------------
// Scenarios. Each gets a fresh browser context (cookies, storage) of one browser.

const scenarios = [];
const scenario = (name, fn) => scenarios.push({ name, fn });

let shared; // (a) leaves its signed-in page to (b)

scenario('a_opens_signed_in_and_calls_the_api_with_the_placeholder', async (browser) => {
  const s = await signedInPage(browser, cfg.sessions.signedIn, '/');
  shared = s;
  const { page, traffic, token } = s;
  assert.equal(await page.locator('#user-name').textContent(), cfg.user.name, 'rendered user');
  assert.equal(s.refreshUser?.name, cfg.user.name, "refresh's user object");
  assert.equal(await page.evaluate(() => window.__test.apiBaseUrl()), mount, "the client's API base");

  // The client's own user query, with the placeholder it was given.
  await traffic.settle();
  const userCalls = traffic.api('user');
  assert.equal(userCalls.length, 1, 'GET api/user after sign-in');
  assert.equal(userCalls[0].requestHeaders.authorization, `Bearer ${token}`);
  assert.equal(userCalls[0].status, 200);
  assert.equal(JSON.parse(userCalls[0].body).name, cfg.user.name);

  // The start-up config, asked for as the signed-in user, offers none of LibreChat's sign-in.
  const configs = traffic.api('config');
  assert.equal(configs.length, 1, 'one GET api/config');
  assert.equal(configs[0].status, 200);
  const startup = JSON.parse(configs[0].body);
  assert.equal(startup.emailLoginEnabled, false, 'api/config emailLoginEnabled');
  assert.equal(startup.registrationEnabled, false, 'api/config registrationEnabled');

  // Images load with the session cookie alone (no Authorization on <img> requests): the avatar
  // at the root, an image under the mount. The fake LibreChat checks secureImageLinks, so a 200
  // means the BFF added the user's LibreChat cookie.
  for (const prefix of [`${cfg.bff}/images/`, `${ui}/images/`]) {
    const img = traffic.exchanges.filter((e) => e.url.startsWith(prefix));
    assert.equal(img.length, 1, `one image request under ${prefix}`);
    assert.equal(img[0].status, 200, `${img[0].url}`);
    assert.equal(img[0].requestHeaders['sec-fetch-dest'], 'image');
    assert.equal(img[0].requestHeaders.authorization, undefined, 'no Authorization on <img>');
    assert.match(img[0].requestHeaders.cookie ?? '', new RegExp(`^${cfg.cookie.name}=`));
    const type = img[0].responseHeaders.find((h) => h.name.toLowerCase() === 'content-type');
    assert.equal(type?.value, 'image/png');
  }

  // The client's health probe (a static path under the base).
  const health = await page.evaluate(() => window.__test.health());
  assert.ok(health.ok, `health: ${JSON.stringify(health)}`);
  assert.equal(health.data, 'OK');

  // A chat turn: POST through the real axios instance, then its SSE stream via authenticatedFetch.
  const chat = await page.evaluate(() => window.__test.chat('hello from the browser'));
  assert.ok(chat.ok, `chat: ${JSON.stringify(chat)}`);
  assert.equal(chat.data.status, 200, 'stream status');
  assert.match(chat.data.contentType ?? '', /^text\/event-stream/);
  assert.match(chat.data.body, /"final":\s*true/, 'the stream ran to its final event');

  // An unsafe method (the browser adds Origin and Sec-Fetch-Site itself): rename, then list.
  const mark = traffic.mark();
  const renamed = await page.evaluate(
    ([id]) => window.__test.rename(id, 'Renamed in the browser'),
    [chat.data.conversationId],
  );
  assert.ok(renamed.ok, `rename: ${JSON.stringify(renamed)}`);
  await traffic.settle();
  const [update] = traffic.api('convos/update', mark);
  assert.equal(update.requestHeaders.origin, cfg.bff, 'the browser sent its Origin');
  assert.equal(update.requestHeaders['sec-fetch-site'], 'same-origin');
  await page.locator('#list-convos').click();
  await page.locator('#convos li', { hasText: 'Renamed in the browser' }).waitFor();

  await traffic.settle();
  assert.equal(countRefreshes(traffic, 0), 1, 'one refresh: at start-up');
  for (const e of traffic.since(0).filter((e) => e.url.startsWith(apiPrefix))) {
    assert.ok(e.status < 400, `${e.method} ${e.url} → ${e.status}`);
  }
  traffic.assertUnderMount([`${cfg.bff}/images/`]);
  traffic.assertNoLibreChatToken();
  const cookies = await s.context.cookies();
  assert.deepEqual(
    cookies.map((c) => c.name),
    [cfg.cookie.name],
    'the only cookie the browser holds is the BFF session',
  );
  await page.screenshot({ path: join(cfg.artifacts, 'a-signed-in.png') });
});

scenario('b_recovers_from_a_401_through_one_refresh', async () => {
  assert.ok(shared, 'needs the page of scenario a');
  const { page, traffic } = track(shared);
  const stale = `bff-ui.${'0'.repeat(32)}`;
  await page.evaluate((t) => window.__test.setToken(t), stale);
  const mark = traffic.mark();
  // Two calls at once with a stale placeholder: both 401, one (single-flight) refresh, both
  // retried with the new placeholder.
  const [user, convos] = await page.evaluate(() =>
    Promise.all([window.__test.getUser(), window.__test.listConversations()]),
  );
  assert.ok(user.ok, `getUser after recovery: ${JSON.stringify(user)}`);
  assert.equal(user.data.name, cfg.user.name);
  assert.ok(convos.ok, `listConversations after recovery: ${JSON.stringify(convos)}`);
  await traffic.settle();

  const refreshes = traffic.api('auth/refresh', mark);
  assert.equal(refreshes.length, 1, 'exactly one refresh');
  assert.equal(refreshes[0].status, 200);
  const fresh = JSON.parse(refreshes[0].body).token;
  assert.match(fresh ?? '', PLACEHOLDER, 'refresh answered a placeholder');
  assert.notEqual(fresh, stale);
  for (const path of ['user', 'convos']) {
    const calls = traffic.api(path, mark);
    assert.deepEqual(
      calls.map((c) => [c.requestHeaders.authorization, c.status]),
      [
        [`Bearer ${stale}`, 401],
        [`Bearer ${fresh}`, 200],
      ],
      `api/${path}: 401 with the stale placeholder, then 200 with the refreshed one`,
    );
    assert.match(calls[0].body ?? '', /^\s*\{/, `the 401 of api/${path} is JSON`);
  }
  assert.equal(await page.evaluate(() => window.__test.tokenHeader()), `Bearer ${fresh}`);
  const updated = await page.evaluate(() =>
    window.__test.events.filter((e) => e.type === 'tokenUpdated').map((e) => e.detail),
  );
  assert.deepEqual(updated, [fresh], 'one tokenUpdated event, with the new placeholder');
  traffic.assertNoLibreChatToken();
  await page.screenshot({ path: join(cfg.artifacts, 'b-recovered.png') });
});

scenario('c_session_ended_elsewhere_redirects_to_the_product_login', async (browser) => {
  const path = '/c/new?endpoint=FakeAI';
  const s = await signedInPage(browser, cfg.sessions.revoked, path);
  const { page, traffic } = s;
  const revoked = await fetch(cfg.revoke.url, {
    method: 'DELETE',
    headers: { Authorization: `Bearer ${cfg.revoke.token}` },
  });
  assert.ok(revoked.ok, `revoke: ${revoked.status} ${await revoked.text()}`);

  const mark = traffic.mark();
  // The next API call: 401 → refresh answers 200 without a token → the client's
  // redirectToLoginOnce() loads `<base>login?redirect_to=…` → the BFF sends it to the product.
  await page.evaluate(() => {
    window.__test.listConversations();
  });
  await landedOnLogin(page, `${mount}${path}`);
  await traffic.settle();

  const convos = traffic.api('convos', mark);
  assert.deepEqual(
    convos.map((c) => c.status),
    [401],
    'api/convos: 401, not retried',
  );
  const refreshes = traffic.api('auth/refresh', mark);
  assert.equal(refreshes.length, 1, 'exactly one refresh');
  assert.equal(refreshes[0].status, 200);
  assert.equal(JSON.parse(refreshes[0].body).token, undefined, 'refresh answered without a token');
  const nav = traffic.since(mark).find((e) => e.url.startsWith(`${ui}/login`));
  assert.ok(nav, 'a full-page load of <base>login');
  assert.equal(nav.request.resourceType(), 'document');
  assert.equal(
    new URL(nav.url).searchParams.get('redirect_to'),
    path,
    "the client's redirect_to (path under the base)",
  );
  assert.equal(nav.status, 302, `${nav.url} answered a redirect`);
  traffic.assertNoLibreChatToken();
  await page.screenshot({ path: join(cfg.artifacts, 'c-product-login.png') });
});

scenario('d_logout_lands_on_the_after_logout_page', async (browser) => {
  const s = await signedInPage(browser, cfg.sessions.logout, '/c/new');
  const { page, traffic, context } = s;
  const mark = traffic.mark();
  await page.locator('#logout').click();
  await page.waitForURL((u) => productUrl(u.href) === productUrl(cfg.afterLogoutUrl));
  await page.locator('#product-after-logout').waitFor();
  assert.equal(page.url(), cfg.afterLogoutUrl);
  await traffic.settle();
  const [logout] = traffic.api('auth/logout', mark);
  assert.equal(logout.method, 'POST');
  assert.equal(logout.status, 200);
  const answer = JSON.parse(logout.body);
  assert.equal(answer.redirect, cfg.afterLogoutUrl, 'logout answer carries redirect');
  assert.equal(countRefreshes(traffic, mark), 0, 'no sign-in again after logout');
  traffic.assertNoLibreChatToken();
  await page.screenshot({ path: join(cfg.artifacts, 'd-after-logout.png') });

  // The session is over: the BFF says so, and /chat/ goes to the product login.
  const me = await context.request.get(`${cfg.bff}/auth/me`);
  assert.equal(me.status(), 401, '/auth/me after logout');
  await page.goto(`${ui}/`);
  await landedOnLogin(page, `${mount}/`);
});

scenario('e_no_session_opening_a_chat_route_goes_to_the_product_login', async (browser) => {
  const { page, traffic } = await newContext(browser, null);
  await page.goto(`${ui}/c/abc123`);
  await landedOnLogin(page, `${mount}/c/abc123`);
  await traffic.settle();
  const [first] = traffic.exchanges;
  assert.equal(first.url, `${ui}/c/abc123`);
  assert.equal(first.status, 302, 'the SPA route answered a redirect, not the page');
  traffic.assertNoLibreChatToken();
});

scenario('f_page_loaded_without_session_follows_librechat_login_to_the_product', async (browser) => {
  // A static path is served without a session; the page boots, refresh answers without a token,
  // and LibreChat's own login route (the rewritten api/config: openid auto-redirect) leaves for
  // <serverDomain>/oauth/openid, which the BFF sends to the product login.
  const { page, traffic } = await newContext(browser, null);
  const doc = await page.goto(`${ui}/index.html`);
  assert.equal(doc.status(), 200, 'static index.html without a session');
  await page.waitForURL((u) => productUrl(u.href) === productUrl(cfg.loginUrl));
  await page.locator('#product-login').waitFor();
  await traffic.settle();
  const [config] = traffic.api('config');
  assert.equal(config?.status, 200, 'api/config without a session');
  const startup = JSON.parse(config.body);
  for (const key of ['emailLoginEnabled', 'registrationEnabled', 'passwordResetEnabled']) {
    assert.equal(startup[key], false, `api/config ${key}`);
  }
  assert.equal(startup.openidLoginEnabled, true, 'api/config openidLoginEnabled');
  assert.equal(startup.openidAutoRedirect, true, 'api/config openidAutoRedirect');
  assert.match(startup.serverDomain ?? '', new RegExp(`${mount}$`), 'api/config serverDomain');
  const oauth = traffic.exchanges.find((e) => e.url.startsWith(`${ui}/oauth/openid`));
  assert.equal(oauth?.status, 302, `${mount}/oauth/openid answered a redirect`);
  assert.equal(countRefreshes(traffic, 0), 1);
  traffic.assertNoLibreChatToken();
});

// ---------------------------------------------------------------------------------------------

const browser = await chromium.launch({
  executablePath: cfg.chromium,
  headless: true,
  // playwright-core starts Chromium with a fresh temporary profile (--user-data-dir) of its own
  // and removes it on close; it refuses a --user-data-dir here.
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});

const passed = [];
const failed = [];
try {
  for (const { name, fn } of scenarios) {
    const started = Date.now();
    inScenario = [];
    try {
      await fn(browser);
      passed.push(name);
      console.error(`ok   ${name} (${Date.now() - started} ms)`);
    } catch (err) {
      failed.push({ name, error: String(err?.stack ?? err) });
      console.error(`FAIL ${name} (${Date.now() - started} ms)\n${err?.stack ?? err}`);
      for (const [i, s] of inScenario.entries()) {
        await s.page.screenshot({ path: join(cfg.artifacts, `${name}-failure-${i}.png`) }).catch(() => {});
        await s.traffic.settle().catch(() => {});
        await writeFile(
          join(cfg.artifacts, `${name}-failure-${i}.json`),
          JSON.stringify({ url: s.page.url(), console: s.console, traffic: s.traffic.dump() }, null, 2),
        );
      }
    }
    for (const s of inScenario) if (s !== shared) await s.context.close();
  }
} finally {
  await browser.close();
}
process.stdout.write(`${JSON.stringify({ passed, failed })}\n`);
process.exitCode = failed.length ? 1 : 0;
