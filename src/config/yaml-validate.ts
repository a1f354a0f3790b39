import { LineCounter, parseDocument, isMap, isNode, isScalar, type Document } from 'yaml';
import type { z } from 'zod';
import { ErrorCodes, VeshError, type ErrorCode } from '../errors.js';

/** One problem found in a YAML file, located by line so an admin can go straight to it. */
export interface YamlProblem {
  file: string;
  line: number;
  path: string;
  message: string;
}

export function formatProblems(problems: YamlProblem[]): string {
  return problems.map((p) => `${p.file}:${p.line}: ${p.path ? `${p.path}: ` : ''}${p.message}`).join('\n');
}

/** Line (1-based) of the node at `path`, or of its nearest existing parent. */
function lineOf(doc: Document, lc: LineCounter, path: readonly PropertyKey[]): number {
  for (let n = path.length; n >= 0; n--) {
    const node = doc.getIn(path.slice(0, n) as unknown[], true);
    if (isNode(node) && node.range) return lc.linePos(node.range[0]).line;
  }
  return 1;
}

/** Line of the key `key` in the mapping at `path`. */
function lineOfKey(doc: Document, lc: LineCounter, path: readonly PropertyKey[], key: string): number {
  const map = path.length ? doc.getIn(path as unknown[], true) : doc.contents;
  if (isMap(map)) {
    for (const pair of map.items) {
      if (isScalar(pair.key) && String(pair.key.value) === key && pair.key.range) return lc.linePos(pair.key.range[0]).line;
    }
  }
  return lineOf(doc, lc, path);
}

/**
 * Parse YAML text and validate it against a zod schema. Throws a VeshError whose
 * message lists every problem as "file:line: path: message".
 */
export function parseYamlWithSchema<S extends z.ZodType>(
  file: string,
  text: string,
  schema: S,
  code: ErrorCode = ErrorCodes.CONFIG_INVALID,
): { value: z.output<S>; doc: Document } {
  const lc = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lc, prettyErrors: false, uniqueKeys: true });
  if (doc.errors.length > 0) {
    const problems = doc.errors.map((e) => ({
      file,
      // prettyErrors off leaves linePos unset; the offset is always there.
      line: lc.linePos(e.pos[0]).line,
      path: '',
      message: `YAML syntax: ${e.message.split('\n')[0]}`,
    }));
    throw new VeshError(code, formatProblems(problems), { details: { problems } });
  }
  const raw = doc.toJS() ?? {};
  const result = schema.safeParse(raw);
  if (!result.success) {
    const problems = result.error.issues.flatMap((issue) => {
      // An unknown key is reported where that key is written, one line per key.
      if (issue.code === 'unrecognized_keys') {
        return issue.keys.map((key) => ({
          file,
          line: lineOfKey(doc, lc, issue.path, key),
          path: [...issue.path, key].map(String).join('.'),
          message: `unknown setting "${key}"`,
        }));
      }
      return [{ file, line: lineOf(doc, lc, issue.path), path: issue.path.map(String).join('.'), message: issue.message }];
    });
    throw new VeshError(code, formatProblems(problems), { details: { problems } });
  }
  return { value: result.data, doc };
}
