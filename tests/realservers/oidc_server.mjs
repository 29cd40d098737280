// A private OAuth2 authorization server for the tests: panva's oidc-provider with a config from
// tests/realservers/oidc.py. Not a fake: every grant, token, form and check below is oidc-provider's own;
// this file only supplies what a deployment must supply (clients, accounts, keys, resource servers and the
// login/consent pages behind `interactions.url`, written as the library's documentation shows).
//
// Usage: node oidc_server.mjs CONFIG.json   (run with NODE_PATH=<folder holding node_modules>)
// On success it prints one JSON line on stdout: {"ready": true, "issuer": ..., "kid": ..., "alg": ...}.
// A port already taken makes it exit with status 98 (EADDRINUSE), so the caller can retry another port.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { createRequire } from 'node:module';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
// oidc-provider lives in a private folder (/opt/pop3-gateway/oidc-provider), not next to this file.
const require = createRequire(path.join(config.module_dir, 'package.json'));
const { default: Provider, errors } = await import(require.resolve('oidc-provider'));

// The signing key persists in the state folder, so a restarted provider keeps its kid (Dovecot caches keys).
const jwksFile = path.join(config.state_dir, 'jwks.json');
let jwks;
if (fs.existsSync(jwksFile)) {
  jwks = JSON.parse(fs.readFileSync(jwksFile, 'utf8'));
} else {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  jwks = { keys: [{ ...jwk, kid: `k${crypto.randomBytes(6).toString('hex')}`, alg: 'RS256', use: 'sig' }] };
  fs.writeFileSync(jwksFile, JSON.stringify(jwks), { mode: 0o600 });
}
const signingKey = jwks.keys[0];
const publicPem = crypto.createPublicKey({ key: signingKey, format: 'jwk' })
  .export({ format: 'pem', type: 'spki' });
fs.writeFileSync(path.join(config.state_dir, 'signing-key.pem'), publicPem);

const accounts = config.accounts; // {accountId: password}
const resources = config.resources; // {indicator: {scope, format}}

const provider = new Provider(config.issuer, {
  clients: config.clients,
  jwks,
  async findAccount(_ctx, accountId) {
    if (!Object.hasOwn(accounts, accountId)) return undefined;
    return { accountId, async claims() { return { sub: accountId }; } };
  },
  scopes: ['openid', 'offline_access'],
  features: {
    devInteractions: { enabled: false },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => config.default_resource,
      useGrantedResource: () => true,
      getResourceServerInfo(_ctx, indicator) {
        const server = resources[indicator];
        if (!server) throw new errors.InvalidTarget();
        return {
          scope: server.scope,
          audience: indicator,
          accessTokenTTL: config.access_token_ttl,
          accessTokenFormat: server.format,
          ...(server.format === 'jwt' ? { jwt: { sign: { alg: 'RS256' } } } : {}),
        };
      },
    },
  },
  // Every grant of a client allowed refresh_token gets a refresh token; each use rotates it.
  issueRefreshToken: (_ctx, client) => client.grantTypeAllowed('refresh_token'),
  rotateRefreshToken: true,
  ttl: {
    AccessToken: config.access_token_ttl,
    ClientCredentials: config.access_token_ttl,
    RefreshToken: config.refresh_token_ttl,
    DeviceCode: config.device_code_ttl,
    Grant: config.refresh_token_ttl,
    Interaction: 600,
    Session: 3600,
  },
  // Dovecot 2.3 refuses a JWT whose header `typ` is not "JWT" ("Cannot find 'typ' field"); oidc-provider
  // writes RFC 9068's "at+jwt" unless told otherwise. Microsoft's tokens also say "JWT".
  formats: {
    customizers: {
      jwt(_ctx, _token, jwt) { if (config.jwt_typ) jwt.header = { ...jwt.header, typ: config.jwt_typ }; },
    },
  },
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  // The provider's own errors as JSON on stderr (captured into the log file); never the tokens.
  renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = `<!DOCTYPE html><html><body><h1>oops</h1><pre id="error">${escape(JSON.stringify(out))}</pre></body></html>`;
  },
});
provider.proxy = false;
provider.on('server_error', (_ctx, err) => console.error('server_error', err));
provider.on('grant.error', (_ctx, err) => console.error('grant.error', err.message));

function escape(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function page(res, status, title, body) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'text/html; charset=utf-8');
  res.setHeader('Cache-Control', 'no-store');
  res.end(`<!DOCTYPE html><html><head><title>${escape(title)}</title></head><body>${body}</body></html>`);
}

async function readForm(req) {
  let size = 0;
  const chunks = [];
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 65536) throw new Error('form too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function loginForm(uid, message) {
  return `<h1>Sign-in</h1><p id="message">${escape(message)}</p>
<form id="login" method="post" action="/interaction/${uid}/login">
<input type="text" name="login" autofocus/><input type="password" name="password"/>
<button type="submit">Sign-in</button></form>`;
}

// The pages behind interactions.url: a password login against `accounts`, then a consent that grants what
// the provider says is missing (oidc-provider's documented interactionDetails/interactionFinished API).
async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) return page(res, 400, 'error', '<p>interaction mismatch</p>');
  const { prompt, params, session } = details;
  if (req.method === 'GET' && !action) {
    if (prompt.name === 'login') return page(res, 200, 'Sign-in', loginForm(uid, 'Sign in'));
    const scopes = [...(prompt.details.missingOIDCScope || []),
      ...Object.values(prompt.details.missingResourceScopes || {}).flat()];
    return page(res, 200, 'Authorize', `<h1>Authorize ${escape(params.client_id)}</h1>
<p id="scopes">${escape(scopes.join(' '))}</p>
<form id="consent" method="post" action="/interaction/${uid}/confirm"><button type="submit">Allow</button></form>`);
  }
  if (req.method !== 'POST') return page(res, 405, 'error', '<p>method not allowed</p>');
  if (action === 'login' && prompt.name === 'login') {
    const form = await readForm(req);
    const login = form.get('login') || '';
    const password = form.get('password') || '';
    const known = Object.hasOwn(accounts, login);
    const expected = Buffer.from(known ? accounts[login] : crypto.randomBytes(16).toString('hex'));
    const given = Buffer.from(password);
    if (!known || expected.length !== given.length || !crypto.timingSafeEqual(expected, given)) {
      return page(res, 401, 'Sign-in', loginForm(uid, 'Invalid login or password'));
    }
    return provider.interactionFinished(req, res, { login: { accountId: login } },
      { mergeWithLastSubmission: false });
  }
  if (action === 'confirm' && prompt.name === 'consent') {
    await readForm(req);
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scope] of Object.entries(missing.missingResourceScopes || {})) {
      grant.addResourceScope(indicator, scope.join(' '));
    }
    const grantId = await grant.save();
    return provider.interactionFinished(req, res, { consent: { grantId } },
      { mergeWithLastSubmission: true });
  }
  if (action === 'abort') {
    return provider.interactionFinished(req, res,
      { error: 'access_denied', error_description: 'End-User aborted interaction' },
      { mergeWithLastSubmission: false });
  }
  return page(res, 400, 'error', `<p>unexpected ${escape(action)} for prompt ${escape(prompt.name)}</p>`);
}

const providerCallback = provider.callback();
const server = http.createServer((req, res) => {
  const match = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|confirm|abort))?$/.exec(req.url.split('?')[0]);
  if (!match) return providerCallback(req, res);
  interaction(req, res, match[1], match[2]).catch((err) => {
    console.error('interaction error', err.message);
    if (!res.headersSent) page(res, 400, 'error', `<p id="error">${escape(err.name)}</p>`);
    else res.end();
  });
});
server.on('error', (err) => {
  console.error(`listen failed: ${err.code}`);
  process.exit(err.code === 'EADDRINUSE' ? 98 : 1);
});
server.listen(config.port, config.host, () => {
  process.stdout.write(`${JSON.stringify({
    ready: true, issuer: config.issuer, kid: signingKey.kid, alg: 'RS256',
  })}\n`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => { server.close(); server.closeAllConnections(); process.exit(0); });
}
