// Verifies one Sigstore bundle with sigstore-js (@sigstore/verify) against a trusted root, with
// the verifier's default thresholds (one transparency-log entry, one verified timestamp).
//
//   node verify.js TRUSTED_ROOT.json KEYS.json BUNDLE.json ARTIFACT
//
// KEYS.json maps each key hint to the key's SubjectPublicKeyInfo (DER, base64). Prints
// `verified <media type>` (exit 0) or `refused <code> <message>` (exit 1).
'use strict';
const fs = require('fs');
const { Verifier, toSignedEntity, toTrustMaterial } = require('@sigstore/verify');
const { bundleFromJSON } = require('@sigstore/bundle');
const { TrustedRoot } = require('@sigstore/protobuf-specs');

const [root, keys, bundle, artifact] = process.argv.slice(2);
try {
  const trustedRoot = TrustedRoot.fromJSON(JSON.parse(fs.readFileSync(root, 'utf8')));
  const byHint = {};
  for (const [hint, der] of Object.entries(JSON.parse(fs.readFileSync(keys, 'utf8')))) {
    byHint[hint] = { rawBytes: Buffer.from(der, 'base64') };
  }
  const b = bundleFromJSON(JSON.parse(fs.readFileSync(bundle, 'utf8')));
  const verifier = new Verifier(toTrustMaterial(trustedRoot, byHint));
  verifier.verify(toSignedEntity(b, fs.readFileSync(artifact)));
  console.log('verified', b.mediaType);
} catch (e) {
  console.log('refused', e.code || e.name || '', e.message);
  process.exit(1);
}
