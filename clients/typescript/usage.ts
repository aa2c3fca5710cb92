// What a frontend does with the generated client, type-checked by tests/test_typescript_client.py
// against the committed spec: create a tenant, add a server, send a batch, read the warmup, and
// handle problem+json errors by their `code`. tests/test_contract.py makes the same requests
// from Python against the one-process app.
import createClient from "openapi-fetch";
import type { components, paths } from "./schema";

type Problem = components["schemas"]["Problem"];
type Server = components["schemas"]["SmtpServerPublic"];

export interface Config {
  baseUrl: string;
  adminToken: string;
  // The mailbox's SMTP endpoint; a preset alone (`gmail`) gives smtp.gmail.com:587 STARTTLS.
  smtpHost: string;
  smtpPort: number;
}

function describe(problem: Problem): string {
  return `${problem.code}: ${problem.detail}${problem.hint ? ` (${problem.hint})` : ""}`;
}

export async function createTenant(config: Config, name: string): Promise<string> {
  const admin = createClient<paths>({
    baseUrl: config.baseUrl,
    headers: { Authorization: `Bearer ${config.adminToken}` },
  });
  const { data, error } = await admin.POST("/v1/tenants", { body: { name } });
  if (error) {
    throw new Error(error.code === "unauthorized" ? "check ABL_ADMIN_TOKEN" : describe(error));
  }
  return data.api_key; // shown once
}

export function tenantClient(config: Config, apiKey: string) {
  return createClient<paths>({
    baseUrl: config.baseUrl,
    headers: { Authorization: `Bearer ${apiKey}` },
  });
}

type Api = ReturnType<typeof tenantClient>;

// A problem is answered by its code; each operation's codes are an enum in the spec.
export async function addGmailServer(
  api: Api,
  config: Config,
  password: string,
): Promise<Server | string> {
  const { data, error } = await api.POST("/v1/servers", {
    body: {
      preset: "gmail",
      host: config.smtpHost,
      port: config.smtpPort,
      security: "starttls",
      username: "sales@acme.example",
      password,
      from_email: "sales@acme.example",
      from_name: "Acme Sales",
      label: "Sales 1",
    },
  });
  if (error) {
    switch (error.code) {
      case "auth_failed":
        return `The mailbox refused the password. ${error.hint ?? ""}`;
      case "server_exists":
        return "This mailbox is already added.";
      case "rate_limited":
        return "Too many checks: try again in a minute.";
      case "validation_failed":
        return (error.errors ?? []).map((e) => `${e.field}: ${e.message}`).join("; ");
      default:
        return describe(error);
    }
  }
  return data;
}

export async function sendBatch(api: Api, campaign: string, recipients: string[]): Promise<number> {
  const { data, error } = await api.POST("/v1/messages", {
    body: {
      messages: recipients.map((to, index) => ({
        to,
        subject: "Hello from Acme",
        text: "Hi, a short note from Acme.",
        campaign,
        // Sent again after a timeout, the batch queues nothing twice.
        idempotency_key: `${campaign}-${index}`,
      })),
    },
  });
  if (error) {
    if (error.code === "duplicate_idempotency_key") throw new Error("keys repeat in the batch");
    throw new Error(describe(error));
  }
  const suppressed = data.items.filter((item) => item.status === "suppressed").length;
  if (suppressed > 0) console.warn(`${suppressed} recipients are on the suppression list`);
  return data.queued;
}

export async function warmupToday(api: Api, serverId: string): Promise<string> {
  const { data, error } = await api.GET("/v1/servers/{server_id}/warmup", {
    params: { path: { server_id: serverId } },
  });
  if (error) {
    return error.code === "server_not_found" ? "no such server" : describe(error);
  }
  const days: number = data.projection.length;
  return `step ${data.step}/${data.top_step}: ${data.remaining_today} of ${data.allowance_today} left today (${days} days projected)`;
}

export async function allEmails(api: Api, campaign: string): Promise<number> {
  let cursor: string | undefined;
  let count = 0;
  do {
    const { data, error } = await api.GET("/v1/messages", {
      params: { query: { campaign, limit: 500, cursor } },
    });
    if (error) {
      throw new Error(error.code === "invalid_cursor" ? "start again from page one" : describe(error));
    }
    count += data.items.length;
    cursor = data.next_cursor ?? undefined;
  } while (cursor);
  return count;
}
