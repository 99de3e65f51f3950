// The page served as LibreChat's web client in the browser test. It uses the REAL request layer
// of LibreChat's client, the npm package `librechat-data-provider`: its axios defaults and
// interceptors (401 → one refresh → retry; refresh answering without a token → full-page load of
// `<base>login?redirect_to=…`), `setTokenHeader`, `request.refreshToken`, `dataService.*` and
// `request.authenticatedFetch`. Around it, the smallest imitation of the client's AuthContext
// (client/src/hooks/AuthContext.tsx, v0.8.7) and Login route (openidAutoRedirect).
//
// State for the test runner is on `document.body.dataset` and `window.__test`.

import {
  apiBaseUrl,
  buildLoginRedirectUrl,
  dataService,
  getTokenHeader,
  request,
  setTokenHeader,
} from 'librechat-data-provider';

const events = [];
for (const type of ['tokenUpdated', 'authRecovery', 'authRedirectStarted']) {
  window.addEventListener(type, (e) => events.push({ type, detail: e.detail ?? null }));
}

const $ = (id) => document.getElementById(id);

function setAuth(state) {
  document.body.dataset.auth = state;
}

function renderSignedIn(user) {
  $('root').innerHTML = `
    <header>
      <strong>LibreChat</strong> · signed in as <span id="user-name"></span>
      <button id="logout" type="button">Log out</button>
    </header>
    <main>
      <div id="images"></div>
      <button id="list-convos" type="button">Conversations</button>
      <ul id="convos"></ul>
    </main>`;
  $('user-name').textContent = user?.name ?? user?.username ?? '';
  $('logout').addEventListener('click', () => logout());
  $('list-convos').addEventListener('click', () => showConversations());
}

async function showConversations() {
  const data = await dataService.listConversations({});
  const list = $('convos');
  list.replaceChildren(
    ...(data.conversations ?? []).map((c) => {
      const li = document.createElement('li');
      li.textContent = c.title ?? c.conversationId;
      return li;
    }),
  );
  return data;
}

// AuthContext.logoutUser.onSuccess: a `redirect` in the answer is followed at once (after the
// Authorization header is cleared); without one the client would route to its own /login.
async function logout() {
  try {
    const data = await dataService.logout();
    if (data?.redirect) {
      setTokenHeader(undefined);
      window.location.replace(data.redirect);
      return { redirect: data.redirect };
    }
    setAuth('logged-out-without-redirect');
    return { redirect: null };
  } catch (err) {
    setAuth('logout-failed');
    return { error: describe(err) };
  }
}

// The user's images as the client shows them: the avatar at the root (LibreChat's avatar URLs
// ignore the base path) and an image under the base. Resolves once both have loaded or failed
// (the fake LibreChat's images are not real PNGs; the test looks at the network answers).
function showImages(userId) {
  const sources = [
    ['avatar', `/images/${userId}/avatar-${userId}.png?manual=true`],
    ['attachment', `images/${userId}/photo.png`],
  ];
  return Promise.all(
    sources.map(
      ([id, src]) =>
        new Promise((resolve) => {
          const img = new Image(24, 24);
          img.id = id;
          img.alt = id;
          img.onload = img.onerror = resolve;
          img.src = src;
          $('images').append(img);
        }),
    ),
  );
}

// The app's startup-config query (useGetStartupConfig, at the root of the client) and
// AuthContext.silentRefresh on mount, then useGetUserQuery once a token is set.
async function boot() {
  const startupConfig = dataService.getStartupConfig();
  startupConfig.catch(() => {});
  let data;
  try {
    data = await request.refreshToken();
  } catch (err) {
    document.body.dataset.bootError = JSON.stringify(describe(err));
    return goToLogin(startupConfig);
  }
  const token = data?.token ?? '';
  if (!token) {
    return goToLogin(startupConfig);
  }
  setTokenHeader(token);
  renderSignedIn(data.user);
  const user = await dataService.getUser();
  $('user-name').textContent = user?.name ?? user?.username ?? '';
  await startupConfig.catch(() => null);
  await showImages(user.id ?? user._id);
  setAuth('signed-in');
}

// No token: AuthContext navigates (client-side) to `login?redirect_to=…`; the Login route reads
// the startup config and, with openidLoginEnabled + openidAutoRedirect + serverDomain, does a
// full-page load of `${serverDomain}/oauth/openid`. Otherwise it would show LibreChat's own login
// form, which is what the BFF must prevent.
async function goToLogin(startupConfig) {
  window.history.replaceState(null, '', apiBaseUrl() + buildLoginRedirectUrl());
  setAuth('signed-out');
  let config;
  try {
    config = await startupConfig;
  } catch (err) {
    setAuth('config-failed');
    return;
  }
  document.body.dataset.config = JSON.stringify(config);
  if (config.openidLoginEnabled && config.openidAutoRedirect && config.serverDomain) {
    window.location.href = `${config.serverDomain}/oauth/openid`;
    return;
  }
  $('root').innerHTML = '<form id="librechat-login"><input name="email" /></form>';
  setAuth('librechat-login-shown');
}

function describe(err) {
  return {
    message: String(err?.message ?? err),
    status: err?.response?.status ?? null,
    data: err?.response?.data ?? null,
  };
}

// Runs one client call and reports how it ended (never throws, so page.evaluate gets a value).
async function outcome(fn) {
  try {
    return { ok: true, data: await fn() };
  } catch (err) {
    return { ok: false, ...describe(err) };
  }
}

async function chat(text) {
  const base = apiBaseUrl();
  const started = await request.post(`${base}/api/agents/chat/FakeAI`, {
    text,
    parentMessageId: '00000000-0000-0000-0000-000000000000',
    conversationId: 'new',
    endpoint: 'FakeAI',
    endpointType: 'custom',
    model: 'fake-model',
  });
  const res = await request.authenticatedFetch(`${base}/api/agents/chat/stream/${started.streamId}`, {
    headers: { Accept: 'text/event-stream' },
  });
  return {
    streamId: started.streamId,
    conversationId: started.conversationId,
    status: res.status,
    contentType: res.headers.get('content-type'),
    body: await res.text(),
  };
}

window.__test = {
  events,
  apiBaseUrl: () => apiBaseUrl(),
  tokenHeader: () => getTokenHeader() ?? null,
  setToken: (token) => setTokenHeader(token),
  getUser: () => outcome(() => dataService.getUser()),
  listConversations: () => outcome(() => showConversations()),
  rename: (conversationId, title) =>
    outcome(() => dataService.updateConversation({ conversationId, title })),
  chat: (text) => outcome(() => chat(text)),
  health: () => outcome(() => dataService.healthCheck()),
  logout: () => logout(),
};

boot();
