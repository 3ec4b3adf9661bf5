"""The templates of revision ``lf-0.5``: LLaMA-Factory at b988ce0 (llmtuner 0.5.1), every text template it had.

Slots and default system prompts are transcribed from LLaMA-Factory 0.5; see :func:`templates.define` for the
slots a template leaves out.
"""

from chipspan.data.templates import BOS, EOS, Token, define


def _lf05(name: str, **fields):
    return define("lf-0.5", name, **fields)


LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. "
    "Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, "
    "racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, "
    "explain why instead of answering something not correct. "
    "If you don't know the answer to a question, please don't share false information."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
XUANYUAN_SYSTEM = (
    "以下是用户和人工智能助手之间的对话。用户以Human开头，人工智能助手以Assistant开头，"
    "会对人类提出的问题给出有帮助、高质量、详细和礼貌的回答，并且总是拒绝参与与不道德、"
    "不安全、有争议、政治敏感等相关的话题、问题和指示。\n"
)
CHATML_USER = ("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",)

LF05_TEMPLATES = [
    _lf05(
        "alpaca",
        user=("### Instruction:\n{{content}}\n\n### Response:\n",),
        separator=("\n\n",),
        default_system=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        ),
    ),
    _lf05(
        "aquila",
        user=("Human: {{content}}###Assistant:",),
        separator=("###",),
        default_system=(
            "A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions."
        ),
        stop_words=("</s>",),
        efficient_eos=True,
    ),
    _lf05("baichuan", user=(Token("<reserved_102>"), "{{content}}", Token("<reserved_103>")), efficient_eos=True),
    _lf05("baichuan2", user=(Token("<reserved_106>"), "{{content}}", Token("<reserved_107>")), efficient_eos=True),
    _lf05(
        "belle",
        user=("Human: {{content}}\n\nBelle: ",),
        system=(BOS, "{{content}}"),
        separator=("\n\n",),
        force_system=True,
    ),
    _lf05("bluelm", user=(Token("[|Human|]:"), "{{content}}", Token("[|AI|]:"))),
    _lf05(
        "chatglm2",
        user=("[Round {{idx}}]\n\n问：{{content}}\n\n答：",),
        system=(Token("[gMASK]"), Token("sop"), "{{content}}"),
        separator=("\n\n",),
        efficient_eos=True,
        force_system=True,
    ),
    _lf05(
        "chatglm3",
        user=(Token("<|user|>"), "\n", "{{content}}", Token("<|assistant|>")),
        assistant=("\n", "{{content}}"),
        system=(Token("[gMASK]"), Token("sop"), Token("<|system|>"), "\n", "{{content}}"),
        function=("{{name}}\n{{arguments}}",),
        observation=(Token("<|observation|>"), "\n", "{{content}}"),
        default_system=(
            "You are ChatGLM3, a large language model trained by Zhipu.AI. "
            "Follow the user's instructions carefully. Respond using markdown."
        ),
        stop_words=("<|user|>", "<|observation|>"),
        efficient_eos=True,
    ),
    _lf05("codegeex2", system=(Token("[gMASK]"), Token("sop"), "{{content}}"), force_system=True),
    _lf05(
        "deepseek",
        user=("User: {{content}}\n\nAssistant:",),
        system=(BOS, "{{content}}"),
        force_system=True,
    ),
    _lf05(
        "deepseekcoder",
        user=("### Instruction:\n{{content}}\n### Response:\n",),
        separator=("\n", Token("<|EOT|>"), "\n"),
        default_system=(
            "You are an AI programming assistant, utilizing the Deepseek Coder model, "
            "developed by Deepseek Company, and you only answer questions related to computer science. "
            "For politically sensitive questions, security and privacy issues, "
            "and other non-computer science questions, you will refuse to answer\n"
        ),
        stop_words=("<|EOT|>",),
        efficient_eos=True,
    ),
    _lf05("default", user=("Human: {{content}}\nAssistant: ",), separator=("\n",)),
    _lf05("falcon", user=("User: {{content}}\nFalcon:",), separator=("\n",), efficient_eos=True),
    _lf05(
        "intern",
        user=("<|User|>:{{content}}", Token("<eoh>"), "\n<|Bot|>:"),
        separator=(Token("<eoa>"), "\n"),
        stop_words=("<eoa>",),
        efficient_eos=True,
    ),
    _lf05(
        "intern2",
        user=CHATML_USER,
        system=(BOS, "<|im_start|>system\n{{content}}<|im_end|>\n"),
        separator=("\n",),
        default_system=(
            "You are an AI assistant whose name is InternLM (书生·浦语).\n"
            "- InternLM (书生·浦语) is a conversational language model that is developed "
            "by Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
            "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen "
            "by the user such as English and 中文."
        ),
        stop_words=("<|im_end|>",),
        efficient_eos=True,
    ),
    _lf05(
        "llama2",
        user=(BOS, "[INST] {{content}} [/INST]"),
        system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
        default_system=LLAMA2_SYSTEM,
        system_in_user=True,
    ),
    _lf05(
        "llama2_zh",
        user=(BOS, "[INST] {{content}} [/INST]"),
        system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
        default_system="You are a helpful assistant. 你是一个乐于助人的助手。",
        system_in_user=True,
    ),
    _lf05("mistral", user=("[INST] {{content}} [/INST]",), system=(BOS, "{{content}}"), force_system=True),
    _lf05(
        "openchat",
        user=("GPT4 Correct User: {{content}}", EOS, "GPT4 Correct Assistant:"),
        assistant=("{{content}}",),
        system=(BOS, "{{content}}"),
        force_system=True,
    ),
    _lf05(
        "qwen",
        user=CHATML_USER,
        system=("<|im_start|>system\n{{content}}<|im_end|>\n",),
        separator=("\n",),
        default_system="You are a helpful assistant.",
        stop_words=("<|im_end|>",),
        replace_eos=True,
    ),
    _lf05(
        "solar",
        user=("### User:\n{{content}}\n\n### Assistant:\n",),
        system=("### System:\n{{content}}\n\n",),
        efficient_eos=True,
    ),
    _lf05(
        "starchat",
        user=(Token("<|user|>"), "\n{{content}}", Token("<|end|>"), "\n", Token("<|assistant|>")),
        system=(Token("<|system|>"), "\n{{content}}", Token("<|end|>"), "\n"),
        separator=("\n",),
        stop_words=("<|end|>",),
        replace_eos=True,
        force_system=True,
    ),
    _lf05("vanilla"),
    _lf05("vicuna", user=("USER: {{content}} ASSISTANT:",), default_system=VICUNA_SYSTEM),
    _lf05("xuanyuan", user=("Human: {{content}} Assistant:",), default_system=XUANYUAN_SYSTEM),
    _lf05("xverse", user=("Human: {{content}}\n\nAssistant: ",)),
    _lf05(
        "yayi",
        user=(Token("<|Human|>"), ":\n{{content}}\n\n", Token("<|YaYi|>"), ":"),
        system=(Token("<|System|>"), ":\n{{content}}\n\n"),
        separator=("\n\n",),
        default_system=(
            "You are a helpful, respectful and honest assistant named YaYi "
            "developed by Beijing Wenge Technology Co.,Ltd. "
            "Always answer as helpfully as possible, while being safe.  "
            "Your answers should not include any harmful, unethical, "
            "racist, sexist, toxic, dangerous, or illegal content. "
            "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
            "If a question does not make any sense, or is not factually coherent, "
            "explain why instead of answering something not correct. "
            "If you don't know the answer to a question, please don't share false information."
        ),
        stop_words=("<|End|>",),
    ),
    _lf05("yi", user=CHATML_USER, separator=("\n",), stop_words=("<|im_end|>",), replace_eos=True),
    _lf05("yuan", user=("{{content}}", Token("<sep>")), separator=("\n",), stop_words=("<eod>",), replace_eos=True),
    _lf05(
        "zephyr",
        user=("<|user|>\n{{content}}", EOS, "<|assistant|>"),
        system=("<|system|>\n{{content}}", EOS),
        default_system="You are a friendly chatbot who always responds in the style of a pirate",
    ),
    _lf05("ziya", user=(Token("<human>"), ":{{content}}\n", Token("<bot>"), ":"), separator=("\n",)),
]
