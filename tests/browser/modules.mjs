// Checks the page's modules that need no browser, under Node: the protocol
// module's reading of server messages and its hello, and the text module's
// language choice and `{slot}` filling. Exits 1 with the failed assertion.
// Usage: node modules.mjs PATH/TO/web
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const [web] = process.argv.slice(2);
const load = (file) => import(pathToFileURL(join(web, file)).href);
const { parseServerMessage, hello, socketUrl, SERVER_TYPES } = await load('protocol.js');
const { TEXT, chooseLanguage, setLanguage, t } = await load('text.js');

// Server messages: the shapes of docs/protocol.md are taken as they are.
const tool = { type: 'tool', id: 'call-1', name: 'abrir_mapa', input: { edificio: 'biblioteca' } };
assert.deepEqual(parseServerMessage(JSON.stringify(tool)), tool);
const rotated = { type: 'rotated', generation: 3, gap_ms: 12.5 };
assert.deepEqual(parseServerMessage(JSON.stringify(rotated)), rotated);
const transcript = { type: 'transcript', role: 'user', stage: 'final', text: 'hola', turn: 1 };
assert.deepEqual(parseServerMessage(JSON.stringify(transcript)), transcript);
for (const type of ['ready', 'speech', 'latency', 'interrupted', 'turn_end', 'usage', 'stats', 'error', 'end']) {
  assert.ok(SERVER_TYPES.includes(type), type);
}
// Anything else is ignored: not JSON, not an object, a later version's
// type, an inherited name, a field missing or of the wrong type.
for (const text of [
  'not json', '[]', 'null', '"tool"', '{}',
  '{"type":"hologram"}', '{"type":"toString"}', '{"type":"constructor"}',
  '{"type":"tool","id":"call-1"}', '{"type":"tool","id":7,"name":"x"}',
  '{"type":"rotated","generation":"2","gap_ms":1}', '{"type":"rotated","generation":2}',
  '{"type":"ready","output":null}', '{"type":"transcript","role":"user","stage":"final","text":"x"}',
]) {
  assert.equal(parseServerMessage(text), null, text);
}

// The hello: PCM names its rate, containers do not; a token only when given.
assert.deepEqual(hello({ format: 'pcm16', language: 'es', voice: '' }),
  { type: 'hello', version: 1, audio: { format: 'pcm16', rate: 16000 }, language: 'es', voice: '' });
assert.deepEqual(hello({ format: 'webm', language: 'en', voice: 'v', token: 'secret' }),
  { type: 'hello', version: 1, audio: { format: 'webm' }, language: 'en', voice: 'v', token: 'secret' });
assert.equal(socketUrl({ protocol: 'https:', host: 'voz.example.edu' }), 'wss://voz.example.edu/ws');
assert.equal(socketUrl({ protocol: 'http:', host: '127.0.0.1:8080' }), 'ws://127.0.0.1:8080/ws');

// Every word in both languages, and every word the page marks exists.
assert.deepEqual(Object.keys(TEXT.en).sort(), Object.keys(TEXT.es).sort());
const page = readFileSync(join(web, 'index.html'), 'utf8');
for (const [, key] of page.matchAll(/data-i18n(?:-placeholder)?="([^"]+)"/g)) assert.ok(key in TEXT.es, key);
const app = readFileSync(join(web, 'app.js'), 'utf8');
const used = [
  ...[...app.matchAll(/\bt\('([a-z-]+)'/g)].map((m) => m[1]),
  ...[...app.matchAll(/label\([^,]+, '([a-z-]+)'/g)].map((m) => m[1]),
  ...[...app.matchAll(/showNote\('[a-z]+', '([a-z-]+)', '([a-z-]+)'/g)].flatMap((m) => [m[1], m[2]]),
];
assert.ok(used.length >= 15, `only ${used.length} keys found in app.js`);
for (const key of used) assert.ok(key in TEXT.es, key);

// Languages: `?ui=` first, then the browser's, Spanish otherwise.
assert.equal(chooseLanguage('en', 'es-ES'), 'en');
assert.equal(chooseLanguage('fr', 'en-GB'), 'en');
assert.equal(chooseLanguage(null, 'pt-BR'), 'es');
assert.equal(chooseLanguage(null, undefined), 'es');
setLanguage('es');
assert.equal(t('rotated', { generation: 2, gap: '40 ms' }),
  'El motor renovó su conexión (generación 2); tu audio esperó 40 ms sin perderse.');
assert.equal(t('no-such-key'), 'no-such-key');
setLanguage('en');
assert.equal(t('frames-dropped', { count: 3 }), '3 frames dropped');
assert.equal(t('frames-dropped', {}), '{count} frames dropped');
console.log('ok');
