import { ErrorCodes, VeshError } from '../errors.js';

/** VE names double as host names and directory names: lower-case letters, digits and inner hyphens. */
export const VE_NAME_PATTERN = /^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$/;

export function assertVeName(name: string): void {
  if (typeof name !== 'string' || !VE_NAME_PATTERN.test(name)) {
    const why = name.length > 32 ? `is ${name.length} characters long (at most 32)` : 'may only hold lower-case letters, digits and inner hyphens';
    throw new VeshError(ErrorCodes.INVALID_NAME, `invalid VE name "${name.slice(0, 64)}": it ${why}; choose a name such as "alice" or "web-1"`);
  }
}
