/** The network identity of one VE. */
export interface VeNetIdentity {
  name: string;
  /** IPv4 address from the configured subnet, e.g. 10.88.0.5. */
  address: string;
  /** Host-side veth name, at most 15 characters, unique per instance. */
  hostVeth: string;
}
