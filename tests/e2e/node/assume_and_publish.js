// aws-sdk (v2) STS assumeRole, then aws-iot-device-sdk (v1) over wss with the temporary
// credentials: publish one message and report. Driven by tests/e2e/test_iam_sts.py.
// Input (environment): SEKISHO_API (https://localhost:PORT), REGION, ACCESS_KEY, SECRET_KEY,
// ROLE_ARN, DATA_HOST, DATA_PORT, CLIENT_ID, TOPIC, PAYLOAD. The CA comes from
// NODE_EXTRA_CA_CERTS. Output: one JSON line.
'use strict';
const AWS = require('aws-sdk');
const awsIot = require('aws-iot-device-sdk');

const env = (k) => {
  const v = process.env[k];
  if (!v) { throw new Error(`${k} is not set`); }
  return v;
};

function done(result) {
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exit(0);
}

const sts = new AWS.STS({
  endpoint: env('SEKISHO_API'),
  region: env('REGION'),
  accessKeyId: env('ACCESS_KEY'),
  secretAccessKey: env('SECRET_KEY'),
  maxRetries: 0,
});

sts.assumeRole({ RoleArn: env('ROLE_ARN'), RoleSessionName: 'node-dashboard' }, (err, data) => {
  if (err) { done({ step: 'assumeRole', error: err.code, message: err.message }); }
  const c = data.Credentials;
  const device = awsIot.device({
    protocol: 'wss',
    host: env('DATA_HOST'),
    port: Number(env('DATA_PORT')),
    region: env('REGION'),
    accessKeyId: c.AccessKeyId,
    secretKey: c.SecretAccessKey,
    sessionToken: c.SessionToken,
    clientId: env('CLIENT_ID'),
    reconnectPeriod: 0,
    keepalive: 30,
  });
  const timer = setTimeout(() => done({ step: 'connect', error: 'timeout' }), 10000);
  device.on('error', (e) => { clearTimeout(timer); done({ step: 'connect', error: String(e && e.message || e) }); });
  let ending = false;
  device.on('close', () => {
    if (ending) { return; }
    clearTimeout(timer);
    done({ step: 'connect', error: 'closed' });
  });
  device.on('connect', () => {
    device.publish(env('TOPIC'), env('PAYLOAD'), { qos: 1 }, (e) => {
      clearTimeout(timer);
      if (e) { done({ step: 'publish', error: String(e.message || e) }); }
      ending = true;
      device.end(false, () => done({ step: 'published', arn: data.AssumedRoleUser.Arn }));
    });
  });
});
