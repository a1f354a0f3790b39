import { LineCounter, parseDocument, isNode, type Document } from 'yaml';
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
      line: e.linePos?.[0]?.line ?? 1,
      path: '',
      message: `YAML syntax: ${e.message.split('\n')[0]}`,
    }));
    throw new VeshError(code, formatProblems(problems), { details: { problems } });
  }
  const raw = doc.toJS() ?? {};
  const result = schema.safeParse(raw);
  if (!result.success) {
    const problems = result.error.issues.map((issue) => ({
      file,
      line: lineOf(doc, lc, issue.path),
      path: issue.path.map(String).join('.'),
      message: issue.message,
    }));
    throw new VeshError(code, formatProblems(problems), { details: { problems } });
  }
  return { value: result.data, doc };
}
