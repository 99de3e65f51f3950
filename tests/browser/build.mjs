// Builds the test page into a directory served as LibreChat's web client (the fake LibreChat's
// `spa_dir`): `index.html` as is and `assets/app.js`, page/app.js bundled with
// librechat-data-provider for the browser.
//
//   node tests/browser/build.mjs [OUT_DIR]      (default: tests/browser/dist)
import { copyFile, mkdir } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

// The package imports two node built-ins for its OpenAPI "actions" helpers, which the page never
// calls; LibreChat's client build polyfills them (vite-plugin-node-polyfills). Here: the browser's
// URL, and a crypto that says so if it is ever reached.
const nodeBuiltins = {
  name: 'node-builtins',
  setup(b) {
    b.onResolve({ filter: /^(url|crypto)$/ }, (args) => ({ path: args.path, namespace: 'builtin' }));
    b.onLoad({ filter: /.*/, namespace: 'builtin' }, (args) => ({
      contents:
        args.path === 'url'
          ? 'export const URL = globalThis.URL; export default { URL: globalThis.URL };'
          : "const crypto = { createHash() { throw new Error('node crypto is not in the browser'); } };\n" +
            'export default crypto;',
      loader: 'js',
    }));
  },
};

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(process.argv[2] ?? join(here, 'dist'));

await mkdir(join(out, 'assets'), { recursive: true });
await copyFile(join(here, 'page', 'index.html'), join(out, 'index.html'));
await build({
  entryPoints: [join(here, 'page', 'app.js')],
  outfile: join(out, 'assets', 'app.js'),
  bundle: true,
  format: 'esm',
  platform: 'browser',
  target: 'chrome120',
  logLevel: 'warning',
  plugins: [nodeBuiltins],
});
