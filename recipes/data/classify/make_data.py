"""Generate the classification data: route an online shop's customer messages to one of four queues.

Labels (intents): `refund` (money back, a return, a cancellation), `delivery` (where the parcel is,
late or lost shipments, the address), `account` (signing in, passwords, the e-mail address, the
account's settings), `praise` (thanks and compliments). Many messages mention another queue's words
("no need for a refund, just tell me where the parcel is" is `delivery`; "the delivery was fast,
thank you" is `praise`), so words alone do not decide the label.

all-MiniLM-L6-v2 with a new (untrained) classification head scores about chance (25%); LoRA on its
attention with the head trained learns the task in a few CPU minutes. The eval set is written only
from message templates that training never uses (paraphrases, not repeats), with products and
numbers drawn the same way.

    python recipes/data/classify/make_data.py   # rewrites train.jsonl and eval.jsonl here

Rows: {"text": "...", "label": "refund" | "delivery" | "account" | "praise"} (`data.format: classification`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PRODUCTS = ["blender", "winter jacket", "phone case", "coffee grinder", "desk lamp", "pair of running shoes",
            "backpack", "kettle", "yoga mat", "bluetooth speaker", "set of knives", "office chair", "rain coat",
            "toaster", "water bottle", "keyboard", "duvet cover", "vacuum cleaner", "board game", "watch"]
COURIERS = ["the courier", "the driver", "DHL", "UPS", "the post office", "your delivery partner"]
OPENERS = ["", "", "", "Hi, ", "Hello, ", "Hi there. ", "Good morning, ", "Hey, ", "Dear support, ", "Excuse me, "]
CLOSERS = ["", "", "", " Thanks.", " Thank you.", " Regards.", " Please help.", " Cheers.", " Thanks in advance."]

# Each label's templates. The last HELD_OUT of each list appear only in the eval set.
TEMPLATES = {
    "refund": [
        "I want my money back for the {product}.",
        "The {product} broke after {days} days, please refund me.",
        "How do I return the {product} and get a refund?",
        "Please cancel order {order} and refund the payment.",
        "I was charged twice for the {product}, I need one payment returned.",
        "The {product} is not what I ordered, I'd like to send it back for a refund.",
        "Can I still get a refund for the {product} I bought {days} days ago?",
        "I no longer need the {product}; please take it back and reimburse me.",
        "The {product} arrived on time but it doesn't work, so I want a refund.",
        "Refund please, the {product} stopped working.",
        "I returned the {product} {days} days ago and still haven't seen my money.",
        "Your {product} is faulty and I expect a full refund.",
        "I'd like to cancel my purchase of the {product} and have the money put back on my card.",
        "The {product} fell apart on the first use, give me my money back.",
        "I changed my mind about the {product}, how can I return it for a refund?",
        "Please reverse the charge for order {order}, the {product} was defective.",
    ],
    "delivery": [
        "Where is my {product}? It was supposed to arrive {days} days ago.",
        "My order {order} still hasn't arrived.",
        "The tracking for order {order} hasn't changed in {days} days.",
        "{courier} left my parcel at the wrong address.",
        "When will the {product} be delivered?",
        "I don't want a refund, I just want to know where my {product} is.",
        "Can I change the delivery address for order {order}?",
        "The parcel with the {product} says delivered but nothing is at my door.",
        "My {product} is stuck in transit with {courier}.",
        "Is it possible to have the {product} shipped faster?",
        "It has been {days} days and the {product} is still not here.",
        "{courier} never came and the {product} is marked as delayed.",
        "Could you tell me the expected arrival date of order {order}?",
        "No need to cancel anything, I just need the {product} to actually show up.",
        "The package for order {order} seems to be lost somewhere on the way.",
        "I moved house, please send the {product} to my new address.",
    ],
    "account": [
        "I can't log in to my account.",
        "I forgot my password and the reset email never arrives.",
        "How do I change the email address on my account?",
        "My account is locked after too many sign-in attempts.",
        "I want to delete my account and all my data.",
        "I can't sign in to check the status of order {order}.",
        "The two-factor code is not being sent to my phone.",
        "Please update the phone number on my profile.",
        "Someone else may have accessed my account, I saw an order for a {product} I never placed.",
        "The website keeps logging me out every {days} minutes.",
        "I'd like to unsubscribe from your newsletter emails.",
        "My password reset link says it has expired.",
        "I can't see my order history because the login page shows an error.",
        "How can I merge my two customer accounts into one?",
        "I need to change the name on my profile.",
        "The app says my username doesn't exist, but I ordered a {product} from you last week.",
    ],
    "praise": [
        "The {product} is fantastic, thank you!",
        "Delivery was super fast, the {product} arrived in {days} days. Great service!",
        "I love my new {product}, best purchase this year.",
        "Your support team solved my problem in minutes, thank you so much.",
        "Just wanted to say the {product} exceeded my expectations.",
        "Thanks to {courier} for handling the {product} with such care.",
        "Great quality {product} and lovely packaging.",
        "I was worried I'd need a refund, but the {product} works perfectly. Thanks!",
        "Ten out of ten, I'll definitely order from you again.",
        "The {product} looks even better than in the pictures.",
        "Really impressed with how quickly you replied, keep it up.",
        "I've recommended your shop to all my friends after buying the {product}.",
        "What a pleasant surprise, the {product} came a day early and works great.",
        "Compliments to your team, signing up and ordering was effortless.",
        "The {product} is exactly what I needed, much appreciated.",
        "Order {order} was perfect from start to finish, well done.",
    ],
}
HELD_OUT = 4
LABELS = sorted(TEMPLATES)


def message(rng: random.Random, template: str) -> str:
    text = template.format(product=rng.choice(PRODUCTS), days=rng.randint(2, 21), order=f"#{rng.randint(10000, 99999)}",
                           courier=rng.choice(COURIERS))
    opener = rng.choice(OPENERS)
    if opener.endswith(", ") and not text.startswith(("I ", "I'", "DHL", "UPS")):
        text = text[0].lower() + text[1:]  # the sentence goes on after the greeting's comma
    text = opener + text
    text = text[0].upper() + text[1:]
    closer = rng.choice(CLOSERS)
    text += "" if "thank" in text.lower() and "thank" in closer.lower() else closer
    return text.lower() if rng.random() < 0.15 else text  # some people never use capitals


def rows(rng: random.Random, n_per_label: int, held_out: bool) -> list[dict]:
    out, seen = [], set()
    for label in LABELS:
        pool = TEMPLATES[label][-HELD_OUT:] if held_out else TEMPLATES[label][:-HELD_OUT]
        made = 0
        while made < n_per_label:
            text = message(rng, rng.choice(pool))
            if text not in seen:
                seen.add(text)
                out.append({"text": text, "label": label})
                made += 1
    rng.shuffle(out)
    return out


def main(n_train: int = 100, n_eval: int = 30, seed: int = 1234) -> None:
    """`n_train` and `n_eval` rows per label."""
    rng = random.Random(seed)
    here = Path(__file__).parent
    for name, chunk in (("train", rows(rng, n_train, False)), ("eval", rows(rng, n_eval, True))):
        with open(here / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in chunk:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
