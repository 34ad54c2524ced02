// The page's words, Spanish first and English, and the language they are
// shown in. Elements carry `data-i18n` (text), `data-i18n-args` (JSON values
// for `{name}` slots) and `data-i18n-placeholder`; `translatePage` fills them.

export const TEXT = Object.freeze({
  es: {
    start: 'Hablar', stop: 'Detener', language: 'Idioma', voice: 'Voz', 'voice-default': 'Predeterminada',
    engine: 'Motor', 'engine-any': 'Automático', 'engine-busy': '{name} (ocupado)',
    'low-bandwidth': 'Bajo ancho de banda (Opus)', transcript: 'Transcripción', type: 'Escribe un mensaje',
    send: 'Enviar', metrics: 'Uso y rendimiento', controls: 'Conversación',
    'm-latency': 'Latencia (fin de voz → audio)', 'm-server-latency': 'Latencia en el servidor', 'm-cost': 'Coste',
    'm-budget': 'Presupuesto restante',
    'budget-spent': 'El presupuesto se ha agotado: la conversación termina después de esta respuesta.',
    'budget-ended': 'Conversación terminada: el presupuesto se ha agotado.',
    'budget-refused': 'No queda presupuesto para una conversación nueva.',
    'm-speech': 'Tokens de voz (entrada / salida)', 'm-text': 'Tokens de texto (entrada / salida)',
    'm-audio': 'Audio (enviado / reproducido)', 'm-decoder': 'Decodificador', 'm-queues': 'Colas',
    'm-capture': 'Captura', 'm-engine': 'Motor', 'm-rotations': 'Relevos del motor',
    you: 'Tú', assistant: 'Sonora', connecting: 'Conectando…', listening: 'Te escucho. Habla cuando quieras.',
    ended: 'Conversación terminada.', 'mic-denied': 'No hay permiso para usar el micrófono. Actívalo en el navegador o escribe tu pregunta.',
    'no-capture': 'Este navegador no puede capturar audio (ni AudioWorklet ni MediaRecorder con Opus). Escribe tu pregunta.',
    'no-token': 'No se obtuvo un permiso para conversar',
    'no-mic': 'No se encontró ningún micrófono. Escribe tu pregunta.',
    'socket-failed': 'No se pudo conectar con el servidor.', busy: 'El servidor está ocupado; inténtalo de nuevo en un momento.',
    queued: 'En espera de un motor libre: puesto {position} de {waiting}. Todavía no se te oye.',
    'unknown-engine': 'El servidor ya no tiene el motor «{engine}». La lista está al día: elige otro.',
    'unknown-voice': 'Ese motor no ofrece la voz elegida. La lista está al día: elige otra.',
    interrupted: 'interrumpida', worklet: 'AudioWorklet PCM 16 kHz', recorder: 'MediaRecorder', 'text-only': 'solo texto',
    concealed: 'ocultados', refused: 'rechazados', dropped: 'descartados', 'frames-dropped': '{count} tramas descartadas',
    last: 'última', other: 'English',
    tool: 'Herramienta',
    'tool-call': 'El motor pidió la herramienta «{name}» con {input}. Esta página no ejecuta herramientas: le respondió que no está disponible.',
    rotation: 'Conexión',
    rotated: 'El motor renovó su conexión (generación {generation}); tu audio esperó {gap} sin perderse.',
    'rotated-engine': 'El motor falló: la conversación continúa en {engine}, con todo lo dicho hasta ahora.',
    'rotated-engine-voice': 'El motor falló: la conversación continúa en {engine} (voz {voice}), con todo lo dicho hasta ahora.',
    reconnecting: 'Se perdió la conexión; reconectando (intento {attempt})…', connection: 'Conexión',
    'resumed-skipped': 'Conexión recuperada; {gap} de la respuesta no se pudieron guardar mientras estabas desconectado.',
  },
  en: {
    start: 'Talk', stop: 'Stop', language: 'Language', voice: 'Voice', 'voice-default': 'Default',
    engine: 'Engine', 'engine-any': 'Automatic', 'engine-busy': '{name} (busy)',
    'low-bandwidth': 'Low bandwidth (Opus)', transcript: 'Transcript', type: 'Type a message',
    send: 'Send', metrics: 'Usage and performance', controls: 'Conversation',
    'm-latency': 'Latency (end of speech → audio)', 'm-server-latency': 'Server latency', 'm-cost': 'Cost',
    'm-budget': 'Budget left',
    'budget-spent': 'The budget is spent: the conversation ends after this reply.',
    'budget-ended': 'Conversation ended: the budget is spent.',
    'budget-refused': 'No budget is left for a new conversation.',
    'm-speech': 'Speech tokens (in / out)', 'm-text': 'Text tokens (in / out)',
    'm-audio': 'Audio (sent / played)', 'm-decoder': 'Decoder', 'm-queues': 'Queues',
    'm-capture': 'Capture', 'm-engine': 'Engine', 'm-rotations': 'Engine hand-offs',
    you: 'You', assistant: 'Sonora', connecting: 'Connecting…', listening: 'Listening. Speak whenever you like.',
    ended: 'Conversation ended.', 'mic-denied': 'Microphone permission was denied. Allow it in the browser, or type your question.',
    'no-capture': 'This browser cannot capture audio (no AudioWorklet, no MediaRecorder with Opus). Type your question.',
    'no-token': 'Could not get a token to talk',
    'no-mic': 'No microphone was found. Type your question.',
    'socket-failed': 'Could not connect to the server.', busy: 'The server is busy; try again in a moment.',
    queued: 'Waiting for a free engine: place {position} of {waiting}. You are not heard yet.',
    'unknown-engine': 'The server no longer has the engine “{engine}”. The list is up to date: pick another.',
    'unknown-voice': 'That engine does not offer the chosen voice. The list is up to date: pick another.',
    interrupted: 'interrupted', worklet: 'AudioWorklet PCM 16 kHz', recorder: 'MediaRecorder', 'text-only': 'text only',
    concealed: 'concealed', refused: 'refused', dropped: 'dropped', 'frames-dropped': '{count} frames dropped',
    last: 'last', other: 'Español',
    tool: 'Tool',
    'tool-call': 'The engine asked for the tool “{name}” with {input}. This page runs no tools: it answered that the tool is unavailable.',
    rotation: 'Connection',
    rotated: 'The engine renewed its connection (generation {generation}); your audio waited {gap} and none was lost.',
    'rotated-engine': 'The engine failed: the conversation goes on in {engine}, with everything said so far.',
    'rotated-engine-voice': 'The engine failed: the conversation goes on in {engine} (voice {voice}), with everything said so far.',
    reconnecting: 'The connection dropped; reconnecting (attempt {attempt})…', connection: 'Connection',
    'resumed-skipped': 'Connection restored; {gap} of the reply could not be kept while you were away.',
  },
});

let current = 'es';

/** The language asked for (`?ui=`), else the browser's if it is Spanish or English, else Spanish. */
export function chooseLanguage(asked, browser) {
  if (asked && TEXT[asked]) return asked;
  const preferred = (browser || 'es').toLowerCase().slice(0, 2);
  return TEXT[preferred] ? preferred : 'es';
}

export function language() {
  return current;
}

export function setLanguage(lang) {
  if (TEXT[lang]) current = lang;
}

/** The text for `key`, with `{name}` slots filled from `args`; the key itself when unknown. */
export function t(key, args) {
  const text = TEXT[current][key] ?? key;
  if (!args) return text;
  return text.replace(/\{(\w+)\}/g, (slot, name) => (name in args ? String(args[name]) : slot));
}

/** Marks `el` to show `key` (with `args`) in whichever language is current, and shows it now. */
export function label(el, key, args) {
  el.dataset.i18n = key;
  if (args) el.dataset.i18nArgs = JSON.stringify(args);
  el.textContent = t(key, args);
  return el;
}

/** Fills every marked element under `root` in the current language. */
export function translatePage(root = document) {
  document.documentElement.lang = current;
  for (const el of root.querySelectorAll('[data-i18n]')) {
    const args = el.dataset.i18nArgs ? JSON.parse(el.dataset.i18nArgs) : undefined;
    el.textContent = t(el.dataset.i18n, args);
  }
  for (const el of root.querySelectorAll('[data-i18n-placeholder]')) el.placeholder = t(el.dataset.i18nPlaceholder);
}
