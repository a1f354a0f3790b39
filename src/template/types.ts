/** What a VE needs to know of the template it is built on. Stored as templates/NAME/template.json. */
export interface TemplateInfo {
  name: string;
  /** How it was made: 'debian' | 'busybox' | 'import'. */
  kind: string;
  /** Absolute path of the shared, read-only root filesystem (the overlay lower layer). */
  rootfs: string;
  createdAt: string;
  /** argv of the VE's init (PID 1), e.g. ["/sbin/init"]. */
  init: string[];
  /** Signal that asks this init for a clean power-off (busybox init: SIGUSR2; sysvinit: SIGPWR with our inittab). */
  stopSignal: string;
  /** Host uid/gid of the template's uid/gid 0 on disk: 0 (as built); an older vesh shifted templates to its one VE range. */
  idmapBase: number;
  sizeBytes: number;
}

export type TemplateKind = 'debian' | 'busybox';

export interface BuildProgress {
  /** 0..1 where known, null for "working" without a measure. */
  fraction: number | null;
  message: string;
}

/** An imported template, with what the import left out of the archive. */
export interface ImportedTemplateInfo extends TemplateInfo {
  imported: {
    /** Device nodes in the archive, never created (a VE's /dev comes from the engine). */
    skippedDevices: number;
    /** FIFOs and sockets (and any device) found after unpacking and removed. */
    removedSpecialFiles: number;
    /** Entries whose mode was narrowed: world-writable, or setuid/setgid not on a root-owned file. */
    clampedModes: number;
  };
}
