// aws-sdk (v2) against the object store: bucket, put, managed multipart upload, get, head,
// list, presigned GET (fetched with Node's https), delete, and a missing key. Driven by
// tests/e2e/test_s3.py. Input (environment): SEKISHO_S3 (https://localhost:PORT), REGION,
// ACCESS_KEY, SECRET_KEY, BUCKET. The CA comes from NODE_EXTRA_CA_CERTS. Output: one JSON line.
'use strict';
const AWS = require('aws-sdk');
const crypto = require('crypto');
const https = require('https');

const env = (k) => {
  const v = process.env[k];
  if (!v) { throw new Error(`${k} is not set`); }
  return v;
};
const s3 = new AWS.S3({
  endpoint: env('SEKISHO_S3'),
  region: env('REGION'),
  accessKeyId: env('ACCESS_KEY'),
  secretAccessKey: env('SECRET_KEY'),
  s3ForcePathStyle: true,
  signatureVersion: 'v4',
  maxRetries: 0,
});
const Bucket = env('BUCKET');
const sha = (b) => crypto.createHash('sha256').update(b).digest('hex');
const fetch = (url) => new Promise((resolve, reject) => {
  https.get(url, (res) => {
    const chunks = [];
    res.on('data', (c) => chunks.push(c));
    res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks) }));
  }).on('error', reject);
});

(async () => {
  const out = {};
  await s3.createBucket({ Bucket }).promise();
  const small = crypto.randomBytes(1024 * 1024);
  await s3.putObject({ Bucket, Key: 'node/small.bin', Body: small, ContentType: 'application/x-node' }).promise();
  const big = crypto.randomBytes(12 * 1024 * 1024);
  const up = await s3.upload({ Bucket, Key: 'node/big.bin', Body: big }, { partSize: 5 * 1024 * 1024, queueSize: 2 }).promise();
  out.multipartETag = up.ETag;
  const got = await s3.getObject({ Bucket, Key: 'node/big.bin' }).promise();
  out.bigSame = sha(got.Body) === sha(big);
  const head = await s3.headObject({ Bucket, Key: 'node/small.bin' }).promise();
  out.smallLength = head.ContentLength;
  out.smallType = head.ContentType;
  const list = await s3.listObjectsV2({ Bucket, Prefix: 'node/' }).promise();
  out.keys = list.Contents.map((o) => o.Key);
  const url = s3.getSignedUrl('getObject', { Bucket, Key: 'node/small.bin', Expires: 60 });
  const fetched = await fetch(url);
  out.presignedStatus = fetched.status;
  out.presignedSame = sha(fetched.body) === sha(small);
  await s3.deleteObject({ Bucket, Key: 'node/small.bin' }).promise();
  try {
    await s3.getObject({ Bucket, Key: 'node/small.bin' }).promise();
    out.missing = 'found';
  } catch (e) {
    out.missing = e.code;
  }
  process.stdout.write(JSON.stringify(out) + '\n');
})().catch((e) => {
  process.stdout.write(JSON.stringify({ error: e.code, message: e.message }) + '\n');
  process.exit(1);
});
