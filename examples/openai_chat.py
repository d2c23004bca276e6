"""Chat with `vllm serve MODEL --kv-cache-backend seqkv` through the OpenAI client.

    bash scripts/serve.sh                      # in another terminal (SmolLM2 on port 8000)
    python examples/openai_chat.py [--base-url http://127.0.0.1:8000/v1] [--model NAME]

A two-turn conversation: the first answer streams token by token, the follow-up resends the
conversation (its prefix comes from the compressed prefix cache). Needs only the `openai`
package; the server does the rest.
"""

import argparse

import openai


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="default: the server's first model")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")
    model = args.model or client.models.list().data[0].id
    messages = [{"role": "system", "content": "You are a concise Python tutor."},
                {"role": "user", "content": "What is a list comprehension?"}]

    print(f"model: {model}")
    print(f"user: {messages[-1]['content']}")
    print("assistant: ", end="", flush=True)
    stream = client.chat.completions.create(model=model, messages=messages, stream=True,
                                            max_tokens=args.max_tokens, temperature=0)
    answer = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            answer.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()

    messages += [{"role": "assistant", "content": "".join(answer)},
                 {"role": "user", "content": "Show a short example."}]
    reply = client.chat.completions.create(model=model, messages=messages,
                                           max_tokens=args.max_tokens, temperature=0)
    print(f"user: {messages[-1]['content']}")
    print(f"assistant: {reply.choices[0].message.content}")
    print(f"finish_reason: {reply.choices[0].finish_reason}, "
          f"tokens: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion")


if __name__ == "__main__":
    main()
