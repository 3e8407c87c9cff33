// The official openai Node SDK against Cocoon's OpenAI-compatible API, run by
// tests/test_openai_node.py: `node matrix.mjs` with COCOON_BASE_URL, COCOON_API_KEY and
// COCOON_MODEL set. Prints one JSON object: what the SDK gave back for each case, for the
// test to assert on. No case throws: an unexpected error is printed as {"error": ...}.
import OpenAI from "openai";

const baseURL = process.env.COCOON_BASE_URL;
const apiKey = process.env.COCOON_API_KEY;
const model = process.env.COCOON_MODEL;

// A fetch that records every HTTP attempt the SDK makes (its retries included).
function recordingFetch(attempts) {
  return async (url, init) => {
    const started = Date.now();
    const response = await fetch(url, init);
    attempts.push({
      status: response.status,
      retryAfter: response.headers.get("retry-after"),
      startedMs: started,
      answeredMs: Date.now(),
    });
    return response;
  };
}

function described(error) {
  if (error instanceof OpenAI.APIError) {
    return {
      class: error.constructor.name,
      status: error.status ?? null,
      code: error.code ?? null,
      type: error.type ?? null,
      body: error.error ?? null, // the parsed JSON body; undefined when it was not JSON
      contentType: error.headers?.get?.("content-type") ?? null,
      retryAfter: error.headers?.get?.("retry-after") ?? null,
    };
  }
  return { class: error?.constructor?.name ?? typeof error, message: String(error) };
}

const WEATHER = {
  type: "function",
  function: {
    name: "get_weather",
    description: "The weather in a city now.",
    parameters: {
      type: "object",
      properties: { city: { type: "string", maxLength: 30 } },
      required: ["city"],
      additionalProperties: false,
    },
  },
};

const cases = {
  async plain() {
    const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
    const reply = await client.chat.completions.create({
      model,
      messages: [{ role: "user", content: "Say hello." }],
      max_tokens: 8,
    });
    return {
      content: reply.choices[0].message.content,
      finish: reply.choices[0].finish_reason,
      usage: reply.usage,
      cost: reply.cocoon?.cost_nanoton ?? null,
    };
  },

  async streamed() {
    const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
    const stream = await client.chat.completions.create({
      model,
      messages: [{ role: "user", content: "Say hi." }],
      max_tokens: 8,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = "";
    let finish = null;
    let usage = null;
    let usageChunkChoices = null;
    let chunks = 0;
    for await (const chunk of stream) {
      chunks += 1;
      for (const choice of chunk.choices) {
        text += choice.delta?.content ?? "";
        finish = choice.finish_reason ?? finish;
      }
      if (chunk.usage) {
        usage = chunk.usage;
        usageChunkChoices = chunk.choices.length;
      }
    }
    return { text, finish, usage, usageChunkChoices, chunks };
  },

  async contextOverflow() {
    const attempts = [];
    // Default retries (2): a 400 must not be retried.
    const client = new OpenAI({ baseURL, apiKey, fetch: recordingFetch(attempts) });
    try {
      await client.chat.completions.create({
        model,
        messages: [{ role: "user", content: "apple banana cherry ".repeat(1200) }],
        max_tokens: 8,
      });
      return { error: "no error" };
    } catch (error) {
      return {
        ...described(error),
        isBadRequest: error instanceof OpenAI.BadRequestError,
        attempts: attempts.length,
      };
    }
  },

  async notFoundAndNotAllowed() {
    const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
    const out = {};
    for (const [name, call] of [
      ["model", () => client.models.retrieve("no-such-model")],
      ["path", () => client.get("/no/such/path")],
      ["method", () => client.get("/chat/completions")],
    ]) {
      try {
        await call();
        out[name] = { error: "no error" };
      } catch (error) {
        out[name] = { ...described(error), isNotFound: error instanceof OpenAI.NotFoundError };
      }
    }
    return out;
  },

  async toolRoundTrip() {
    const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
    const question = { role: "user", content: "What is the weather in Paris?" };
    const reply = await client.chat.completions.create({
      model,
      messages: [question],
      tools: [WEATHER],
      tool_choice: "required",
      parallel_tool_calls: false, // one call: a reply may otherwise hold several
      max_tokens: 60,
      temperature: 0,
    });
    const message = reply.choices[0].message;
    const call = message.tool_calls?.[0];
    const answer = await client.chat.completions.create({
      model,
      messages: [
        question,
        message,
        { role: "tool", tool_call_id: call.id, content: '{"celsius": 21, "sky": "clear"}' },
      ],
      tools: [WEATHER],
      tool_choice: "none",
      max_tokens: 30,
    });
    return {
      finish: reply.choices[0].finish_reason,
      content: message.content,
      calls: (message.tool_calls ?? []).map((c) => ({
        id: c.id,
        type: c.type,
        name: c.function.name,
        arguments: c.function.arguments,
      })),
      answer: answer.choices[0].message.content,
      answerCalls: answer.choices[0].message.tool_calls ?? null,
    };
  },

  // The server allows this key one request at a time (the test starts it so): a second
  // request while a stream runs gets 429 with Retry-After; the SDK waits that long and
  // retries. The running stream is stopped once the 429 came, so the retry can be served.
  async rateLimited() {
    const holder = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
    const controller = new AbortController();
    const running = await holder.chat.completions.create(
      {
        model,
        messages: [{ role: "user", content: "Count from 1 to 500, one number per line." }],
        max_tokens: 1500,
        stream: true,
      },
      { signal: controller.signal },
    );
    const iterator = running[Symbol.asyncIterator]();
    await iterator.next(); // the first chunk: the turn runs and holds the key's one place

    const refused = {};
    try {
      const noRetry = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
      await noRetry.chat.completions.create({
        model,
        messages: [{ role: "user", content: "Hi" }],
        max_tokens: 4,
      });
      refused.error = "no error";
    } catch (error) {
      Object.assign(refused, described(error), {
        isRateLimit: error instanceof OpenAI.RateLimitError,
      });
    }

    const attempts = [];
    const patient = new OpenAI({
      baseURL,
      apiKey,
      maxRetries: 5,
      fetch: async (url, init) => {
        const response = await recordingFetch(attempts)(url, init);
        if (response.status === 429) controller.abort(); // the first turn gives its place up
        return response;
      },
    });
    const served = await patient.chat.completions.create({
      model,
      messages: [{ role: "user", content: "Hi" }],
      max_tokens: 4,
    });
    try {
      while (!(await iterator.next()).done);
    } catch {
      // aborted, as meant
    }
    const waits = attempts.slice(1).map((a, i) => a.startedMs - attempts[i].answeredMs);
    return {
      refused,
      statuses: attempts.map((a) => a.status),
      retryAfter: attempts.map((a) => a.retryAfter),
      waitsMs: waits,
      served: served.choices[0].finish_reason,
    };
  },
};

const only = process.argv.slice(2);
const results = {};
for (const [name, run] of Object.entries(cases)) {
  if (only.length && !only.includes(name)) continue;
  try {
    results[name] = await run();
  } catch (error) {
    results[name] = { error: described(error) };
  }
}
process.stdout.write(JSON.stringify(results) + "\n");
