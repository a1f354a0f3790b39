/** Print rows as aligned columns, the way `ps` and `vzlist` do. */
export function printTable(header: string[], rows: string[][], out: (line: string) => void = console.log): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const fmt = (r: string[]) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ');
  out(fmt(header));
  for (const r of rows) out(fmt(r));
}
