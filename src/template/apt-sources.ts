import { promises as fs } from 'node:fs';
import path from 'node:path';

/** One Debian archive entry, as apt on this host has it configured. */
export interface AptSource {
  uri: string;
  suites: string[];
  components: string[];
}

/**
 * Read the host's apt sources (one-line /etc/apt/sources.list and *.list,
 * deb822 *.sources), binary ("deb") entries only. Files apt itself ignores
 * (other extensions, such as ".disabled") are ignored too.
 */
export async function readAptSources(root = '/etc/apt'): Promise<AptSource[]> {
  const out: AptSource[] = [];
  const files = [path.join(root, 'sources.list')];
  const dir = path.join(root, 'sources.list.d');
  for (const f of (await fs.readdir(dir).catch(() => [] as string[])).sort()) {
    if (f.endsWith('.list') || f.endsWith('.sources')) files.push(path.join(dir, f));
  }
  for (const f of files) {
    const text = await fs.readFile(f, 'utf8').catch(() => null);
    if (text === null) continue;
    if (f.endsWith('.sources')) out.push(...parseDeb822Sources(text));
    else out.push(...parseOneLineSources(text));
  }
  return out;
}

export function parseOneLineSources(text: string): AptSource[] {
  const out: AptSource[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.replace(/#.*/, '').trim();
    if (!line.startsWith('deb ')) continue;
    // deb [options] URI SUITE COMPONENT...
    const rest = line.slice(4).replace(/^\[[^\]]*\]\s*/, '').trim().split(/\s+/);
    const [uri, suite, ...components] = rest;
    if (uri && suite) out.push({ uri, suites: [suite], components });
  }
  return out;
}

export function parseDeb822Sources(text: string): AptSource[] {
  const out: AptSource[] = [];
  for (const stanza of text.split(/\n\s*\n/)) {
    const fields = new Map<string, string>();
    let last = '';
    for (const raw of stanza.split('\n')) {
      if (raw.startsWith('#')) continue;
      if (/^\s/.test(raw) && last) {
        fields.set(last, `${fields.get(last)} ${raw.trim()}`);
        continue;
      }
      const m = /^([A-Za-z-]+):\s*(.*)$/.exec(raw);
      if (m) {
        last = m[1]!.toLowerCase();
        fields.set(last, m[2]!.trim());
      }
    }
    const types = (fields.get('types') ?? '').split(/\s+/);
    if (!types.includes('deb') || fields.get('enabled')?.toLowerCase() === 'no') continue;
    const suites = (fields.get('suites') ?? '').split(/\s+/).filter(Boolean);
    const components = (fields.get('components') ?? '').split(/\s+/).filter(Boolean);
    for (const uri of (fields.get('uris') ?? '').split(/\s+/).filter(Boolean)) {
      if (suites.length) out.push({ uri, suites, components });
    }
  }
  return out;
}

/**
 * The mmdebstrap mirror arguments for `release`: every configured entry for
 * that release and its -updates/-security suites, as one-line sources.list
 * entries (mmdebstrap takes those as mirrors). Null if apt has none.
 */
export function mirrorsFor(sources: AptSource[], release: string): string[] | null {
  const lines: string[] = [];
  for (const s of sources) {
    for (const suite of s.suites) {
      if (suite === release || suite.startsWith(`${release}-`) || suite.startsWith(`${release}/`)) {
        const comps = s.components.length ? s.components.join(' ') : 'main';
        lines.push(`deb ${s.uri} ${suite} ${comps}`);
      }
    }
  }
  if (!lines.some((l) => l.split(' ')[2] === release)) return null;
  return [...new Set(lines)];
}
